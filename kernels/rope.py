"""Rotary position embedding in one pass over x, forward and backward, in Triton.

`rope(x, cos, sin)` must equal the PyTorch path of dist_moe.model.rope.apply_rope, x * cos + rotate_half(x)
* sin: x (B, H, T, D) in the rotate-half layout, cos and sin (T, D) float32, computed in float32 and returned
in x's dtype. PyTorch spends about eight passes over a float32 copy of x on that formula (and as
many again in the backward); this kernel reads x once and writes the result once. The backward applies the
transposed rotation to the gradient with the same kernel. x may be any strided view whose last dimension is
contiguous, e.g. the (B, T, H, D) projection transposed to (B, H, T, D); the result has x's layout.
"""

import torch
import triton
import triton.language as tl

from .runtime import runs_kernels


@triton.jit
def _rope_kernel(X, Y, COS, SIN, H, T, stride_xb, stride_xh, stride_xt, stride_yb, stride_yh, stride_yt,
                 stride_ct, HALF: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                 TRANSPOSE: tl.constexpr):
    """One (batch, head) and BLOCK_T positions. Forward: y1 = x1 c1 - x2 s1, y2 = x2 c2 + x1 s2 (halves 1, 2 of
    the last dimension); TRANSPOSE (the backward): y1 = x1 c1 + x2 s2, y2 = x2 c2 - x1 s1."""
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (t < T) & (d < HALF)
    x_row = X + b.to(tl.int64) * stride_xb + h * stride_xh + t * stride_xt
    x1 = tl.load(x_row + d, mask=mask).to(tl.float32)
    x2 = tl.load(x_row + HALF + d, mask=mask).to(tl.float32)
    table = t * stride_ct + d
    c1, c2 = tl.load(COS + table, mask=mask), tl.load(COS + table + HALF, mask=mask)
    s1, s2 = tl.load(SIN + table, mask=mask), tl.load(SIN + table + HALF, mask=mask)
    if TRANSPOSE:
        y1, y2 = x1 * c1 + x2 * s2, x2 * c2 - x1 * s1
    else:
        y1, y2 = x1 * c1 - x2 * s1, x2 * c2 + x1 * s2
    y_row = Y + b.to(tl.int64) * stride_yb + h * stride_yh + t * stride_yt
    tl.store(y_row + d, y1.to(Y.dtype.element_ty), mask=mask)
    tl.store(y_row + HALF + d, y2.to(Y.dtype.element_ty), mask=mask)


def _launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, transpose: bool) -> torch.Tensor:
    if x.stride(-1) != 1:
        x = x.contiguous()
    B, H, T, D = x.shape
    y = torch.empty_like(x)  # same strides as x (a dense permuted view keeps its layout)
    BLOCK_T = 16
    grid = (triton.cdiv(T, BLOCK_T), B * H)
    _rope_kernel[grid](x, y, cos, sin, H, T, x.stride(0), x.stride(1), x.stride(2), y.stride(0), y.stride(1),
                       y.stride(2), cos.stride(0), HALF=D // 2, BLOCK_T=BLOCK_T,
                       BLOCK_D=triton.next_power_of_2(D // 2), TRANSPOSE=transpose, num_warps=4)
    return y


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _launch(x, cos, sin, transpose=False)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _launch(grad, cos, sin, transpose=True), None, None


def supports(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """x 4-D with an even last dimension, cos/sin (T, D) float32 with unit last stride, all on CUDA (or on CPU
    under TRITON_INTERPRET=1)."""
    on_device = runs_kernels(x)
    return (on_device and x.dim() == 4 and x.shape[-1] % 2 == 0
            and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and cos.shape == sin.shape == (x.shape[2], x.shape[3]) and cos.dtype == sin.dtype == torch.float32
            and cos.stride(-1) == sin.stride(-1) == 1 and cos.stride(0) == sin.stride(0)
            and cos.device == sin.device == x.device)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin for x (B, H, T, D), cos and sin (T, D) float32; differentiable in x."""
    if not supports(x, cos, sin):
        raise ValueError(f"rope kernel: unsupported x {tuple(x.shape)} {x.dtype} on {x.device} with cos "
                         f"{tuple(cos.shape)} {cos.dtype} (see supports())")
    return _Rope.apply(x, cos, sin)
