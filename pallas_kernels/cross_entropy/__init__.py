"""Fused linear + softmax cross-entropy kernels."""
