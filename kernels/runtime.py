"""What every kernel file asks of the Triton it runs on, in one place: whether kernels are interpreted on
the CPU (TRITON_INTERPRET=1, the tests), whether Gluon's Hopper API is the one these kernels were written
for, and the global memory Triton needs for descriptors a kernel makes on the device."""

import os

import torch
import triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
GLUON = triton.__version__.startswith("3.6.") and not INTERPRET  # Gluon's API moves between releases


def runs_kernels(t: torch.Tensor) -> bool:
    """True where the Triton path can take t: on CUDA, or on the CPU under the interpreter."""
    return t.is_cuda or (INTERPRET and t.device.type == "cpu")


def descriptor_scratch(size: int, alignment: int, stream) -> torch.Tensor:
    """Global memory for the tensor descriptors kernels make on the device (`triton.set_allocator`)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")
