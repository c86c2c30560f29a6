"""The MoE transformer: plain PyTorch (no deepspeed); parallelism enters only through the MoE layers' EP group."""
