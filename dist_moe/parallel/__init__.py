"""Expert-parallel groups, the all-to-all, and the DeepSpeed MoE contract (which imports deepspeed)."""
from dist_moe.accelerator import tell_deepspeed

tell_deepspeed()
