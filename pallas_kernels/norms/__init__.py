"""LayerNorm and RMSNorm kernels (Pallas-Triton): the forward with the residual add fused in
(`triton_fwd`, which also holds the tiling shared with the backward) and the backward
(`triton_bwd`)."""
