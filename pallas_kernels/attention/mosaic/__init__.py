"""Pallas Mosaic GPU attention for Hopper: the forward (`fwd`), the dK/dV and dQ kernels
(`bwd`, with their steps in `bwd_steps` and the split-consumer forms in `bwd_split`) and what
they share (`common`: barriers, rings, tables). Design notes: docs/attention_mosaic.md."""
