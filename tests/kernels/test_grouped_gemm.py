"""Grouped GEMM and SwiGLU activation kernels (kernels/grouped_gemm.py, grouped_gemm_gluon.py) against float64
references.

Without CUDA the Triton kernels run under TRITON_INTERPRET=1 (fp32, fp16, small shapes); with CUDA, bf16
and larger shapes too (the TMA GEMMs on Hopper only, the Gluon ones on Triton 3.6 only: no interpreter).
Segment sizes include empty ones and sizes that are no multiple of any tile.
"""

import pytest
import torch
import torch.nn.functional as F

from dist_moe.kernels import grouped_gemm as gg

CUDA = torch.cuda.is_available()  # without it, tests/conftest.py turns on TRITON_INTERPRET before triton loads

DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
HOPPER = CUDA and torch.cuda.get_device_capability()[0] == 9
TMA_DTYPES = [torch.bfloat16] if CUDA else [torch.float16]  # the TMA GEMM takes 16-bit operands
# (segment sizes, K, N): empty segments, sizes no multiple of any tile, N and K no multiple of the tile (the
# interpreter's is 16 x 32 x 16; the H100's 128 x 256 x 64); rows past the last segment stay unwritten.
TMA_CASES = [([3, 0, 17, 1, 40, 0], 32, 48), ([0, 0, 40], 24, 40), ([5, 9, 0, 2, 30], 48, 16)]
if CUDA:
    TMA_CASES += [([0, 700, 129, 1, 2000, 0, 64, 300], 512, 1408), ([2048] * 4, 2048, 1408),
                  ([i * 37 % 300 for i in range(64)], 1408, 2816)]  # 64 experts, many tiles a program
needs_tma = pytest.mark.skipif(CUDA and not HOPPER, reason="the TMA GEMM is built for Hopper")
GLUON = HOPPER and gg.GLUON  # the Gluon kernel: compiled for Hopper only, no interpreter


def relative_error(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


def segments(sizes, *widths, dtype, tail=5):
    """Random (sum(sizes) + tail, width) rows per width, and the expert_tiles of the segment sizes."""
    rows = [torch.randn(sum(sizes) + tail, w, device=DEVICE, dtype=dtype) for w in widths]
    return rows, torch.tensor(sizes, device=DEVICE), gg.expert_tiles(torch.tensor(sizes, device=DEVICE))


@needs_tma
@pytest.mark.parametrize("kernel", ["triton", pytest.param("gluon", marks=pytest.mark.skipif(
    not GLUON, reason="the Gluon kernel needs Hopper and Triton 3.6"))])
@pytest.mark.parametrize("transposed", [False, True], ids=["w", "w^T"])
@pytest.mark.parametrize("dtype", TMA_DTYPES, ids=str)
@pytest.mark.parametrize("case", TMA_CASES, ids=str)
def test_tma_grouped_mm_multiplies_each_segment_by_its_expert(case, dtype, transposed, kernel):
    """transposed: the weights are a (E, K, N) view of (E, N, K) storage, as for an input gradient."""
    sizes, K, N = case
    (x,), counts, tiles = segments(sizes, K, dtype=dtype)
    w = torch.randn(len(sizes), *((N, K) if transposed else (K, N)), device=DEVICE, dtype=dtype) / K ** 0.5
    w = w.transpose(1, 2) if transposed else w
    out = (gg.grouped_mm if kernel == "triton" else gg.grouped_mm_gluon)(x, w, tiles)
    n = sum(sizes)
    assert relative_error(out[:n], gg.grouped_mm_reference(x.double(), w.double(), counts)[:n]) < TOLERANCE[dtype]


@pytest.mark.skipif(not GLUON, reason="the Gluon kernel needs Hopper and Triton 3.6")
@pytest.mark.parametrize("case", [([0, 700, 129, 1, 2000, 0, 64, 300], 512, 1408), ([3, 0, 17], 200, 40),
                                  ([i * 37 % 300 for i in range(64)], 1408, 2048)], ids=str)
def test_gluon_weight_grad_sums_each_segments_x_transposed_times_grad(case):
    """K = 200 is no multiple of the 128 tile; the rows past every segment are NaN, which must never be read."""
    sizes, K, N = case
    n = sum(sizes)
    (x, grad), counts, (ends, _) = segments(sizes, K, N, dtype=torch.bfloat16, tail=70)
    x[n:], grad[n:] = float("nan"), float("nan")
    out = gg.grouped_mm_weight_grad_gluon(x, grad, ends)
    pairs = zip(x[:n].double().split(sizes), grad[:n].double().split(sizes))
    expected = torch.stack([a.t() @ b for a, b in pairs])
    assert out.shape == (len(sizes), K, N) and relative_error(out, expected) < TOLERANCE[torch.bfloat16]
    for e, size in enumerate(sizes):
        assert size > 0 or torch.equal(out[e], torch.zeros_like(out[e]))


@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "row_weighted"])
@pytest.mark.parametrize("use_triton", [True, False], ids=["triton", "torch"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(7, 33), (300, 1408) if CUDA else (11, 300)], ids=str)
def test_swiglu_forward_and_backward_equal_autograd_in_float64(shape, dtype, use_triton, weighted):
    """h13 = [h1 | h3] side by side in one (rows, 2F) buffer; F=33 and 300 are no multiple of the 128 tile.
    Weighted: each row's output times its gate weight, whose gradient is the backward's third output."""
    h13 = torch.randn(shape[0], 2 * shape[1], device=DEVICE, dtype=dtype) * 3
    grad = torch.randn(shape, device=DEVICE, dtype=dtype) * 3
    row_weight = torch.rand(shape[0], device=DEVICE) if weighted else None
    h13_64 = h13.double().requires_grad_()
    weight_64 = row_weight.double().requires_grad_() if weighted else torch.ones((), dtype=torch.float64)
    out_64 = F.silu(h13_64[:, :shape[1]]) * h13_64[:, shape[1]:] * (weight_64[:, None] if weighted else 1.0)
    out_64.backward(grad.double())
    out = gg.swiglu(h13, use_triton, row_weight)
    assert out.dtype == dtype and out.shape == shape and relative_error(out, out_64.detach()) < TOLERANCE[dtype]
    recomputed, grad_h13, grad_row_weight = gg.swiglu_backward(h13, grad, use_triton, row_weight)
    assert torch.equal(recomputed, out)
    for half in (slice(None, shape[1]), slice(shape[1], None)):  # each half alone: a swap would fail
        assert relative_error(grad_h13[:, half], h13_64.grad[:, half]) < TOLERANCE[dtype]
    if weighted:
        assert grad_row_weight.dtype == torch.float32 and relative_error(grad_row_weight, weight_64.grad) < 1e-5
    else:
        assert grad_row_weight is None


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_swiglu_backward_in_place_writes_over_its_inputs(dtype):
    h13, grad = torch.randn(5, 140, device=DEVICE, dtype=dtype), torch.randn(5, 70, device=DEVICE, dtype=dtype)
    row_weight = torch.rand(5, device=DEVICE)
    expected = gg.swiglu_backward(h13, grad, True, row_weight)
    out = gg.swiglu_backward(h13, grad, True, row_weight, in_place=True)
    assert out[0] is grad and out[1] is h13
    assert all(torch.equal(a, b) for a, b in zip(out, expected))
