"""DeepSpeed picks its accelerator when it is first imported, and on a machine without CUDA it falls back to
the CPU with a warning on every start. Packages that import deepspeed call `tell_deepspeed()` first."""

import os


def tell_deepspeed() -> None:
    """DS_ACCELERATOR=cpu when torch sees no CUDA device; a DS_ACCELERATOR set by the user wins."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
