"""flash_attention (kernels/flash_attention.py) against SDPA on float64 copies of the same inputs.

Without CUDA the kernels run under TRITON_INTERPRET=1 (tests/conftest.py sets it before triton loads) on a few small
fp32/fp16 shapes; with CUDA a wider grid runs, bf16 included. Forward output and dq, dk, dv are checked.
"""

import pytest
import torch


from dist_moe.kernels import flash_attention as fa

CUDA = torch.cuda.is_available()  # without it, tests/conftest.py turns on TRITON_INTERPRET before triton loads

DEVICE = "cuda" if CUDA else "cpu"
# RMS error / RMS of the float64 reference must stay under the larger of this and twice SDPA's own error in
# the same dtype; max error / max |ref| under 10x that. Reference scales are floored at 0.05, the low end of
# these shapes' gradients (N=1 has dq = dk = 0, so only rounding noise is left to compare).
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

# (B, Hq, Hkv, N, D, causal, window, dtype): ragged N, MHA / GQA 2 / GQA 4 / MQA, causal / full / window.
CPU_CASES = [
    (1, 4, 1, 37, 64, True, 0, F32),
    (2, 4, 2, 100, 128, False, 0, F32),
    (1, 4, 4, 64, 64, True, 18, F32),  # window % block == 2: the last query row a key block reaches
    (1, 8, 2, 100, 64, True, 47, F16),  # window % block == block - 1: the first edge query block
    (1, 4, 2, 37, 128, True, 0, F16),
    (1, 2, 1, 1, 16, True, 0, F32),
]
GPU_CASES = [
    (2, 8, hkv, n, d, causal, window, dtype)
    for n in (1, 37, 1000)
    for d in (64, 128)
    for hkv in (8, 4, 2, 1)
    for causal, window in ((True, 0), (False, 0), (True, 66))
    for dtype in (F16, BF16, F32)
] + [(2, 8, 2, 1000, d, True, 127, dtype) for d in (64, 128) for dtype in (F16, BF16, F32)] \
  + [(1, 16, 4, n, 128, True, w, BF16) for n in (2048, 3000) for w in (0, 514)]


def _case_id(case):
    B, Hq, Hkv, N, D, causal, window, dtype = case
    mode = f"window{window}" if window else ("causal" if causal else "full")
    return f"B{B}-Hq{Hq}-Hkv{Hkv}-N{N}-D{D}-{mode}-{str(dtype)[6:]}"


def _poison_allocator():
    """Fill the CUDA caching allocator's free memory with NaN, so outputs the kernel fails to write show up."""
    if CUDA:
        torch.full((1 << 27,), float("nan"), device=DEVICE)


def _inputs(B, Hq, Hkv, N, D, dtype, seed):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    q = torch.randn(B, Hq, N, D, device=DEVICE, dtype=dtype, generator=g)
    k = torch.randn(B, Hkv, N, D, device=DEVICE, dtype=dtype, generator=g)
    v = torch.randn(B, Hkv, N, D, device=DEVICE, dtype=dtype, generator=g)
    do = torch.randn(B, Hq, N, D, device=DEVICE, dtype=dtype, generator=g)
    return q, k, v, do


def _run(fn, q, k, v, do, **kw):
    """Output and (dq, dk, dv) of fn on fresh leaf copies of q, k, v."""
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v, **kw)
    out.backward(do.to(out.dtype))
    return out, q.grad, k.grad, v.grad


def _errors(got, ref):
    diff = got.double() - ref
    return (diff.norm() / ref.norm().clamp_min(0.05 * ref.numel() ** 0.5)).item(), \
        (diff.abs().max() / ref.abs().max().clamp_min(0.05)).item()


def _assert_close(name, got, ref, tol, torch_own=None):
    """got vs the float64 ref; torch_own (SDPA in got's dtype) widens tol to twice its own error."""
    assert got.shape == ref.shape and torch.isfinite(got).all(), f"{name}: shape or non-finite values"
    err, max_err = _errors(got, ref)
    if torch_own is not None:
        tol = max(tol, 2 * _errors(torch_own, ref)[0])
    assert err <= tol and max_err <= 10 * tol, f"{name}: relative error {err:.2e}, max error {max_err:.2e}, tol {tol}"


@pytest.mark.parametrize("case", GPU_CASES if CUDA else CPU_CASES, ids=_case_id)
def test_forward_and_gradients_match_sdpa_float64(case):
    B, Hq, Hkv, N, D, causal, window, dtype = case
    q, k, v, do = _inputs(B, Hq, Hkv, N, D, dtype, seed=N * 131 + Hkv)
    _poison_allocator()
    got = _run(fa.flash_attention, q, k, v, do, causal=causal, window=window)
    ref = _run(fa.attention_reference, q.double(), k.double(), v.double(), do, causal=causal, window=window)
    torch_own = _run(fa.attention_reference, q, k, v, do, causal=causal, window=window)
    for name, g, r, t in zip(("out", "dq", "dk", "dv"), got, ref, torch_own):
        assert g.dtype == dtype
        _assert_close(name, g, r, TOLERANCE[dtype], t)


@pytest.mark.parametrize("D,dtype", [(64, F32)] + ([(128, BF16)] if CUDA else []), ids=str)
def test_custom_scale_and_strided_layout_match_reference(D, dtype):
    """q/k/v as transposed views of (B, N, H, D), a non-default sm_scale; the output keeps q's layout. (On a
    Hopper GPU, D = 128 in bf16 runs the Gluon forward.)"""
    B, Hq, Hkv, N = 1, 4, 2, 45
    q, k, v, do = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in _inputs(B, Hq, Hkv, N, D, dtype, seed=3))
    got = _run(fa.flash_attention, q, k, v, do, causal=True, sm_scale=0.3)
    ref = _run(fa.attention_reference, q.double(), k.double(), v.double(), do, causal=True, sm_scale=0.3)
    assert got[0].stride() == q.stride()
    for name, g, r in zip(("out", "dq", "dk", "dv"), got, ref):
        _assert_close(name, g, r, TOLERANCE[dtype])


@pytest.mark.skipif(not (CUDA and fa.GLUON and torch.cuda.get_device_capability() == (9, 0)),
                    reason="the Gluon forward runs on Hopper with Triton 3.6")
@pytest.mark.parametrize("causal", [True, False])
def test_hopper_forward_runs_the_gluon_kernel_and_writes_the_triton_kernels_lse(causal, monkeypatch):
    """At D = 128 in bf16 the Gluon forward is what runs, and its O and LSE (which the Triton backward reads)
    equal the Triton forward's."""
    q, k, v, _ = _inputs(2, 8, 2, 1000, 128, BF16, seed=11)
    assert fa._gluon_forward_applies(q, 0) and not fa._gluon_forward_applies(q, 66)
    o, lse = fa._forward(q, k, v, causal, 0, 0.125)
    monkeypatch.setattr(fa, "GLUON", False)
    o_triton, lse_triton = fa._forward(q, k, v, causal, 0, 0.125)
    torch.testing.assert_close(lse, lse_triton, rtol=0, atol=1e-4)
    torch.testing.assert_close(o, o_triton, rtol=2e-2, atol=2e-2)


def test_unaligned_inputs_match_reference():
    """A view starting one element into its storage cannot feed a tensor descriptor; it must still be right."""
    B, Hq, N, D = 1, 2, 20, 32
    flat = torch.randn(B * Hq * N * D + 1, device=DEVICE)
    q = k = v = flat[1:].view(B, Hq, N, D)
    do = torch.randn(B, Hq, N, D, device=DEVICE)
    got = _run(fa.flash_attention, q, k, v, do, causal=False)
    ref = _run(fa.attention_reference, q.double(), k.double(), v.double(), do, causal=False)
    for name, g, r in zip(("out", "dq", "dk", "dv"), got, ref):
        _assert_close(name, g, r, TOLERANCE[F32])


def test_a_late_dominant_key_rescales_the_running_sum():
    """A key far past the first key block whose score beats the earlier ones by ~200 (base 2) must get the
    whole softmax: the running sums are rescaled when a row's max grows (unscaled, 2^200 overflows fp32)."""
    q, k, v, do = _inputs(1, 2, 1, 300, 32, F32, seed=9)
    k[:, :, 200] = 40.0 * q[:, 0, 200] / q[:, 0, 200].norm()  # query 200 of head 0 now prefers key 200 by far
    q[:, 0, 200] *= 4.0
    got = _run(fa.flash_attention, q, k, v, do, causal=False)
    ref = _run(fa.attention_reference, q.double(), k.double(), v.double(), do, causal=False)
    assert ref[0][0, 0, 200].sub(v[0, 0, 200].double()).abs().max() < 1e-3  # the softmax is all on key 200
    for name, g, r in zip(("out", "dq", "dk", "dv"), got, ref):
        _assert_close(name, g, r, TOLERANCE[F32])


def test_window_wider_than_sequence_equals_causal():
    q, k, v, _ = _inputs(1, 2, 1, 40, 32, F32, seed=5)
    causal = fa.flash_attention(q, k, v, causal=True)
    for window in (40, 1000):
        torch.testing.assert_close(fa.flash_attention(q, k, v, causal=True, window=window), causal,
                                   rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not CUDA, reason="bitwise repeatability of the GPU launch order")
def test_gqa_gradients_are_deterministic():
    """dK/dV are summed over the group inside one program (no atomics): two runs agree bit for bit."""
    q, k, v, do = _inputs(2, 16, 2, 777, 128, BF16, seed=7)
    first = _run(fa.flash_attention, q, k, v, do, causal=True)
    second = _run(fa.flash_attention, q, k, v, do, causal=True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_supports_accepts_only_handled_inputs():
    def t(*shape, dtype=F16):
        return torch.empty(*shape, dtype=dtype, device=DEVICE)

    assert fa.supports(t(2, 8, 10, 64), t(2, 2, 10, 64), t(2, 2, 10, 64))
    assert fa.supports(t(1, 4, 7, 128, dtype=F32), t(1, 1, 7, 128, dtype=F32), t(1, 1, 7, 128, dtype=F32))
    assert not fa.supports(t(2, 8, 10, 80), t(2, 2, 10, 80), t(2, 2, 10, 80))  # head dim
    assert not fa.supports(t(2, 8, 10, 64), t(2, 3, 10, 64), t(2, 3, 10, 64))  # Hq % Hkv
    assert not fa.supports(t(2, 8, 10, 64), t(2, 2, 12, 64), t(2, 2, 12, 64))  # KV-cache shapes
    assert not fa.supports(t(2, 8, 10, 64), t(2, 2, 10, 64, dtype=F32), t(2, 2, 10, 64))  # mixed dtypes
    x = t(1, 2, 10, 64, dtype=torch.float64)
    assert not fa.supports(x, x, x)
    if CUDA:
        x = torch.empty(1, 2, 10, 64, dtype=F16)
        assert not fa.supports(x, x, x)  # CPU tensors outside the interpreter


def test_bad_window_and_unsupported_shape_raise():
    q, k, v, _ = _inputs(1, 2, 1, 8, 16, F32, seed=0)
    with pytest.raises(ValueError, match="window=4"):
        fa.flash_attention(q, k, v, causal=False, window=4)
    with pytest.raises(ValueError, match="window=-1"):
        fa.flash_attention(q, k, v, window=-1)
    x = torch.randn(1, 2, 8, 80, device=DEVICE)
    with pytest.raises(ValueError, match="unsupported"):
        fa.flash_attention(x, x, x)
