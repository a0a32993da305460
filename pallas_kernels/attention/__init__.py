"""Attention kernels: the masking rules, the dropout hash and tile math shared by every kernel,
the Pallas-Triton forward and backward, and the Mosaic GPU kernels for Hopper (`mosaic/`)."""
