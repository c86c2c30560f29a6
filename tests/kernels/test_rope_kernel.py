"""The one-pass RoPE kernel (kernels/rope.py) against a float64 rotation, forward and backward.

Without CUDA it runs under TRITON_INTERPRET=1 (fp32, fp16; bf16 on CUDA only). Inputs are the transposed
(B, T, H, D) -> (B, H, T, D) views the attention layer hands it, with YaRN's scale folded into cos and sin (so
they are not a pure rotation) and a position offset (a decoding step's slice of the tables).
"""

import pytest
import torch

from dist_moe.config import ModelConfig
from dist_moe.kernels import rope as kernel
from dist_moe.model.rope import apply_rope, rope_cache

CUDA = torch.cuda.is_available()  # without it, tests/conftest.py turns on TRITON_INTERPRET before triton loads
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
TOLERANCE = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def rotation_float64(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Pairs (i, i + D/2) as complex numbers times (cos + i sin): the rotate-half RoPE, in float64."""
    half = x.shape[-1] // 2
    z = torch.complex(x[..., :half].double(), x[..., half:].double())
    rotated = z * torch.complex(cos[:, :half].double(), sin[:, :half].double())
    return torch.cat([rotated.real, rotated.imag], dim=-1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, H, T, D, offset", [(2, 3, 37, 32, 0), (1, 4, 20, 96, 5), (2, 2, 9, 128, 100)])
def test_rope_kernel_matches_a_float64_rotation_forward_and_backward(dtype, B, H, T, D, offset):
    m = ModelConfig(d_model=D * 4, num_heads=4, num_kv_heads=2, max_seq_len=256, rope_scaling="yarn",
                    rope_factor=4.0, rope_original_max_position_embeddings=64)
    cos, sin = (t.to(DEVICE)[offset:offset + T] for t in rope_cache(m, 256))
    g = torch.Generator().manual_seed(T * D)
    x = torch.randn(B, T, H, D, generator=g).to(DEVICE, dtype).transpose(1, 2).requires_grad_()  # (B, H, T, D) view
    grad_out = torch.randn(B, H, T, D, generator=g).to(DEVICE, dtype)

    y = kernel.rope(x, cos, sin)
    y.backward(grad_out)
    x64 = x.detach().double().requires_grad_()
    y64 = rotation_float64(x64, cos, sin)
    y64.backward(grad_out.double())

    assert y.dtype == dtype and y.stride() == x.stride()  # x's (B, T, H, D) layout kept
    tol = TOLERANCE[dtype]
    scale = y64.abs().max().item()
    assert (y.double() - y64).abs().max().item() <= tol * scale
    assert (x.grad.double() - x64.grad).abs().max().item() <= tol * x64.grad.abs().max().item()
    # and it is the same function as the PyTorch path of apply_rope
    torch_path = apply_rope(x.detach().cpu(), cos.cpu(), sin.cpu()).to(DEVICE)
    torch.testing.assert_close(y, torch_path, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_kernel_with_arbitrary_tables_matches_the_formula_in_float64(dtype):
    """cos and sin halves that differ (rope_cache's never do) pin down which half each term reads."""
    g = torch.Generator().manual_seed(1)
    B, H, T, D = 2, 3, 21, 64
    cos, sin = (torch.randn(T, D, generator=g).to(DEVICE) for _ in range(2))
    x = torch.randn(B, H, T, D, generator=g).to(DEVICE, dtype).requires_grad_()
    grad_out = torch.randn(B, H, T, D, generator=g).to(DEVICE, dtype)
    y = kernel.rope(x, cos, sin)
    y.backward(grad_out)
    x64 = x.detach().double().requires_grad_()
    first, second = x64.chunk(2, dim=-1)
    y64 = x64 * cos.double() + torch.cat([-second, first], dim=-1) * sin.double()
    y64.backward(grad_out.double())
    tol = TOLERANCE[dtype]
    assert (y.double() - y64).abs().max().item() <= tol * y64.abs().max().item()
    assert (x.grad.double() - x64.grad).abs().max().item() <= tol * x64.grad.abs().max().item()


def test_rope_kernel_refuses_what_it_does_not_support():
    cos = torch.ones(8, 16, device=DEVICE)
    with pytest.raises(ValueError, match="rope kernel"):
        kernel.rope(torch.ones(1, 1, 8, 16, device=DEVICE), cos.double(), cos.double())  # float64 tables
    assert not kernel.supports(torch.ones(1, 1, 8, 15, device=DEVICE), cos[:, :15], cos[:, :15])  # odd D
