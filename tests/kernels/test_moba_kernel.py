"""kernels/moba.py against dist_moe.model.moba's dense-masked reference in float64.

Without CUDA the kernels run under TRITON_INTERPRET=1 on tiny fp32/fp16 shapes (ragged N, GQA, blocks of one
and two tiles, top_k padded to a power of two); with CUDA a wider grid (ids end in bf16, fp16, fp32). The
attention tests feed both sides the reference gate's choice, so a near-tie in the gate cannot flip a block.
"""

import pytest
import torch

from dist_moe.kernels import moba as kernel
from dist_moe.model.moba import moba_attention_reference, select_blocks

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
# RMS error / RMS of the float64 reference (floored at 0.05) must stay under this; max error under 10x.
TOLERANCE = {F32: 1e-4, F16: 3e-3, BF16: 2e-2}

# (B, Hq, Hkv, N, D, block_size, top_k, dtype)
CPU_CASES = [
    (1, 2, 1, 70, 16, 16, 2, F32),  # ragged last block, GQA 2, blocks of one tile
    (1, 4, 2, 77, 32, 32, 3, F16),  # blocks of two tiles, top_k padded to 4
    (2, 2, 2, 48, 16, 16, 1, F32),  # MHA, N a multiple of the block
    (1, 2, 2, 200, 16, 64, 2, F32),  # blocks of several query and key tiles
]
GPU_CASES = [(2, 8, hkv, n, d, bs, k, dtype) for hkv in (8, 2) for n in (1000, 4096) for d in (64, 128)
             for bs, k in ((64, 3), (128, 2)) for dtype in (BF16, F16, F32)]
CASES = GPU_CASES if CUDA else CPU_CASES
_DTYPE_NAMES = {F32: "fp32", F16: "fp16", BF16: "bf16"}
CASE_IDS = ["{}-{}-{}-n{}-d{}-bs{}-k{}-{}".format(*c[:-1], _DTYPE_NAMES[c[-1]]) for c in CASES]  # -k bf16 picks


def _inputs(B, Hq, Hkv, N, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, N, D, generator=g).to(DEVICE, dtype).requires_grad_()
               for h in (Hq, Hkv, Hkv))
    return q, k, v


def _close(got: torch.Tensor, ref: torch.Tensor, dtype, what: str):
    err = (got.double() - ref).float()
    scale = max(ref.float().pow(2).mean().sqrt().item(), 0.05)
    rms, worst = err.pow(2).mean().sqrt().item() / scale, err.abs().max().item() / max(ref.abs().max().item(), 0.05)
    assert rms < TOLERANCE[dtype] and worst < 10 * TOLERANCE[dtype], f"{what}: rms {rms:.2e}, max {worst:.2e}"


def _check_against_reference(q, k, v, block_size, chosen, dtype):
    out = kernel.moba_attention(q, k, v, block_size, chosen.shape[-1], chosen=chosen)
    do = torch.randn_like(out)
    out.backward(do)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = moba_attention_reference(q64, k64, v64, block_size, chosen.shape[-1], chosen=chosen)
    ref.backward(do.double())
    _close(out, ref, dtype, "out")
    for name, got, want in (("dq", q.grad, q64.grad), ("dk", k.grad, k64.grad), ("dv", v.grad, v64.grad)):
        _close(got, want, dtype, name)


@pytest.mark.parametrize("B,Hq,Hkv,N,D,block_size,top_k,dtype", CASES, ids=CASE_IDS)
def test_moba_forward_and_grads_equal_dense_masked_reference(B, Hq, Hkv, N, D, block_size, top_k, dtype):
    q, k, v = _inputs(B, Hq, Hkv, N, D, dtype)
    chosen = select_blocks(q.detach(), k.detach(), block_size, top_k)
    assert (chosen >= 0).any(), "the case must exercise past blocks"
    _check_against_reference(q, k, v, block_size, chosen, dtype)


def test_moba_adversarial_choices_equal_reference(monkeypatch):
    """Every query that can chooses block 0 (one column holds them all) and block 2; blocks 1, 3, 4, ... are
    chosen by nobody. Ranges of three blocks, the last one ragged, so a range walks several blocks."""
    monkeypatch.setattr(kernel, "GATHER_RANGE_ROWS", 48)
    B, Hq, Hkv, N, D, block_size = 1, 2, 1, 100, 16, 16
    q, k, v = _inputs(B, Hq, Hkv, N, D, F32, seed=3)
    own = (torch.arange(N) // block_size)[:, None]
    chosen = torch.tensor([0, 2]).expand(N, 2).masked_fill(torch.tensor([0, 2]) >= own, -1)
    chosen = chosen.expand(B, Hq, N, 2).to(DEVICE)
    _check_against_reference(q, k, v, block_size, chosen, F32)


def test_column_index_lists_each_blocks_queries_in_order():
    g = torch.Generator().manual_seed(4)
    B, Hq, N, K, block_size, range_rows = 2, 3, 50, 3, 8, 16
    num_blocks = N // block_size
    own = torch.arange(N)[:, None] // block_size
    scores = torch.rand(B, Hq, N, num_blocks, generator=g).masked_fill(torch.arange(num_blocks) >= own, -1)
    best, chosen = scores.topk(K, dim=-1)  # distinct past blocks, -1 where fewer exist, as the gate gives
    chosen = chosen.masked_fill(best < 0, -1).to(torch.int32)
    rows, starts = kernel.column_index(chosen.to(DEVICE), num_blocks, range_rows, max_pairs=N * K * 2)
    rows, starts = rows.cpu(), starts.cpu()
    assert starts.shape == (B * Hq, num_blocks, 4 + 1)
    for bh in range(B * Hq):
        picks = chosen.view(B * Hq, N, K)[bh]
        for j in range(num_blocks):
            for r in range(4):
                want = [i for i in range(r * range_rows, min((r + 1) * range_rows, N)) if (picks[i] == j).any()]
                got = rows[bh, starts[bh, j, r]:starts[bh, j, r + 1]].tolist()
                assert got == want, (bh, j, r)


@pytest.mark.parametrize("method", ("kernel", "topk"))
@pytest.mark.parametrize("B,Hq,Hkv,N,D,block_size,top_k,dtype", CASES, ids=CASE_IDS)
def test_moba_gate_picks_the_reference_blocks(B, Hq, Hkv, N, D, block_size, top_k, dtype, method):
    q, k, _ = (x.detach() for x in _inputs(B, Hq, Hkv, N, D, dtype, seed=1))
    want = select_blocks(q.double(), k.double(), block_size, top_k).sort(-1).values
    got = kernel.select_blocks(q, k, block_size, top_k, method=method)[..., :top_k].long().sort(-1).values
    agree = (got == want).all(-1).float().mean().item()
    assert agree >= (1.0 if dtype == F32 else 0.99), f"{1 - agree:.2%} of queries chose other blocks"


def test_moba_gate_by_topk_in_small_chunks_equals_one_chunk():
    """Chunks of one block of queries each (the chunk bound at its smallest) pick what one chunk picks."""
    q, k, _ = (x.detach() for x in _inputs(2, 4, 2, 150, 16, F32, seed=5))
    means = k[:, :, :144].reshape(2, 2, 9, 16, 16).mean(3)
    whole = kernel._gate_by_topk(q, means, 16, 3, 4)
    assert torch.equal(kernel._gate_by_topk(q, means, 16, 3, 4, chunk_elements=1), whole)
    assert (whole[:, :, :16] == -1).all() and (whole[:, :, 16:32, 1:] == -1).all() and (whole[:, :, 64:, :3] >= 0).all()


def test_moba_attention_without_chosen_runs_the_gate_kernel():
    q, k, v = _inputs(1, 2, 1, 64, 16, F32, seed=2)
    got = kernel.moba_attention(q, k, v, 16, 2)
    want = moba_attention_reference(q.double(), k.double(), v.double(), 16, 2)
    _close(got, want, F32, "out")


def test_row_dots_in_chunks_equal_one_product():
    """The backward's delta = rowsum(dO * O), a head at a time (chunk of one element), equals the float64 sum."""
    a, b = (torch.randn(2, 3, 50, 16, generator=torch.Generator().manual_seed(s)).to(DEVICE, BF16) for s in (6, 7))
    want = (a.double() * b.double()).sum(-1)
    torch.testing.assert_close(kernel._row_dots(a, b, chunk_elements=1).double(), want, rtol=1e-5, atol=1e-5)
