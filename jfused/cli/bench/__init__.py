"""`jfused bench`: the fused ops beside XLA, cuDNN and tokamax, measured in one run."""
