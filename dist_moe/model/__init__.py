"""The MoE transformer: a plain nn.Module; parallelism enters only through the MoE layers' EP group."""
from dist_moe.accelerator import tell_deepspeed

tell_deepspeed()  # before model.moe imports deepspeed
