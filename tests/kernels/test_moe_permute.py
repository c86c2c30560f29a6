"""permute / combine (kernels/moe_permute.py), Triton and PyTorch paths, against per-token float64 loops.

Plans come from `route` with real capacity drops; rows that no kept choice points to are filled with NaN,
so a kernel that reads one fails. Without CUDA the Triton path runs under TRITON_INTERPRET=1 (fp32, fp16).
"""

import pytest
import torch

from dist_moe.kernels import moe_permute as mp
from dist_moe.model.moe.dispatch import route

CUDA = torch.cuda.is_available()  # without it, tests/conftest.py turns on TRITON_INTERPRET before triton loads

DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# (T, E, k, capacity): dropless, drops, top-1, top-8, D not a power of two.
CASES = [(13, 4, 1, None, 48), (40, 8, 2, 6, 64), (33, 8, 3, 9, 100), (24, 16, 8, 10, 32), (9, 8, 2, None, 1100)]


def plan_for(T, E, k, capacity, seed):
    gen = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(T, E, generator=gen) * 2, -1)
    weights, indices = torch.topk(probs, k, dim=-1)
    return route(indices.to(DEVICE), weights.to(DEVICE), E, capacity)


def naive_combine(rows, row_index, weights):
    y = torch.zeros(row_index.shape[0], rows.shape[1], dtype=torch.float64)
    for t, j in zip(*torch.nonzero(row_index >= 0, as_tuple=True)):
        y[t] += weights[t, j].double() * rows[row_index[t, j]].double()
    return y


def relative_error(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


@pytest.mark.parametrize("use_triton", [True, False], ids=["triton", "torch"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_permute_gathers_rows_and_its_backward_sums_each_tokens_kept_rows(case, dtype, use_triton):
    T, E, k, capacity, D = case
    plan = plan_for(T, E, k, capacity, seed=T)
    x = torch.randn(T, D, device=DEVICE, dtype=dtype, requires_grad=True)
    rows = mp.permute(x, plan.token_index, plan.row_index, use_triton=use_triton)
    n = int(plan.tokens_per_expert.sum())  # rows past n (dropped choices) are left unwritten by Triton
    assert rows.shape == (T * k, D) and torch.equal(rows[:n], x.detach()[plan.token_index[:n]])
    grad_rows = torch.randn_like(rows)
    grad_rows[n:] = float("nan")  # dropped rows: must not be read
    rows.backward(grad_rows)
    expected = naive_combine(grad_rows.cpu(), plan.row_index.cpu(), torch.ones(T, k))
    assert relative_error(x.grad.cpu(), expected) < TOLERANCE[dtype]


@pytest.mark.parametrize("use_triton", [True, False], ids=["triton", "torch"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_combine_is_the_gate_weighted_sum_of_kept_rows_forward_and_backward(case, dtype, use_triton):
    T, E, k, capacity, D = case
    plan = plan_for(T, E, k, capacity, seed=T + 1)
    num_kept = int(plan.tokens_per_expert.sum())
    rows = torch.randn(T * k, D, device=DEVICE, dtype=dtype)
    rows[num_kept:] = float("nan")  # dropped rows are never read
    rows.requires_grad_()
    weights = (plan.combine_weights + torch.rand(T, k, device=DEVICE)).requires_grad_()
    y = mp.combine(rows, plan.row_index, weights, use_triton=use_triton)
    assert y.dtype == dtype
    r64 = rows.detach().cpu().double().requires_grad_()
    w64 = weights.detach().cpu().double().requires_grad_()
    y_ref = naive_combine(r64, plan.row_index.cpu(), w64)
    assert relative_error(y.cpu(), y_ref.detach()) < TOLERANCE[dtype]
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    kept_rows = plan.row_index[plan.kept].cpu()
    expected_rows = torch.zeros(T * k, D, dtype=torch.float64)
    for t, j in zip(*torch.nonzero(plan.kept.cpu(), as_tuple=True)):
        expected_rows[plan.row_index[t, j]] = w64[t, j].detach() * grad_y[t].cpu().double()
    assert relative_error(rows.grad.cpu()[kept_rows], expected_rows[kept_rows]) < TOLERANCE[dtype]
    expected_w = torch.zeros(T, k, dtype=torch.float64)
    for t, j in zip(*torch.nonzero(plan.kept.cpu(), as_tuple=True)):
        expected_w[t, j] = (grad_y[t].cpu().double() * rows.detach()[plan.row_index[t, j]].cpu().double()).sum()
    assert weights.grad.dtype == torch.float32
    assert relative_error(weights.grad.cpu(), expected_w) < 10 * TOLERANCE[dtype]
    assert torch.all(weights.grad.cpu()[~plan.kept.cpu()] == 0)


def test_combine_accumulates_bf16_rows_in_fp32():
    """Many small bf16 contributions: a bf16 running sum would lose them, an fp32 one rounds once."""
    T, k, D = 4, 8, 16
    rows = torch.full((T * k, D), 1.0 / 256, dtype=torch.bfloat16, device=DEVICE)
    rows[::k] = 1.0
    row_index = torch.arange(T * k, device=DEVICE).view(T, k)
    y = mp.combine(rows, row_index, torch.ones(T, k, device=DEVICE), use_triton=CUDA)
    assert torch.all(y == torch.tensor(1.0 + 7 / 256, dtype=torch.bfloat16))


@pytest.mark.parametrize("use_triton", [True, False], ids=["triton", "torch"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gather_sum_sums_each_tokens_kept_rows_and_never_reads_the_others(dtype, use_triton):
    T, E, k, capacity, D = CASES[2]
    plan = plan_for(T, E, k, capacity, seed=3)
    rows = torch.randn(T * k, D, device=DEVICE, dtype=dtype)
    rows[int(plan.tokens_per_expert.sum()):] = float("nan")
    out = mp.gather_sum(rows, plan.row_index, use_triton=use_triton)
    expected = naive_combine(rows.double().cpu(), plan.row_index.cpu(), torch.ones(T, k))
    assert out.dtype == dtype and relative_error(out.cpu(), expected) < TOLERANCE[dtype]

