"""Expert-parallel process groups (from deepspeed.utils.groups), the all-to-all and the expert exchange."""
