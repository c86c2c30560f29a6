"""GPU check of the Gluon Hopper forward (kernels/flash_attention_gluon.py): correctness, then TF/s beside our
Triton forward and SDPA's cuDNN backend.

Run from the repo root on an H100: `PYTHONPATH=. python3 bench/gluon_fwd_check.py` (about 3 minutes). Each kernel
variant runs in its own subprocess with a timeout, so a variant that fails to compile, computes wrong numbers or
deadlocks on an mbarrier is reported and the others still run. Correctness: o against float32 SDPA (enable_gqa)
and lse against a float32 base-2 logsumexp of the scaled scores on causal/non-causal GQA shapes with ragged N;
last, lse against our Triton forward's own lse (the backward consumes it), once its autotuning is cached.
"""
import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LOG2E = 1.4426950408889634
# (BLOCK_M, BLOCK_N, STAGES, CONSUMERS, OVERLAP, PRODUCER, PINGPONG): see kernels/flash_attention_gluon.py
VARIANTS = {
    "pingpong": (128, 128, 2, 2, True, True, True),
    "2wg": (128, 128, 2, 2, True, True, False),
    "2wg-pp-s3-n64": (128, 64, 3, 2, True, True, True),
    "1part-ws": (128, 128, 2, 1, True, True, False),
    "1part-noWS": (128, 128, 2, 1, True, False, False),
    "serial-pp": (128, 128, 2, 2, False, True, True),
    "pingpong-s3": (128, 128, 3, 2, True, True, True),
}
CHECK_SHAPES = [(2, 8, 2, 128, True), (2, 8, 2, 1000, True), (2, 8, 2, 2048, True), (1, 8, 8, 333, True),
                (2, 8, 2, 1000, False), (2, 8, 2, 2048, False)]  # (B, Hq, Hkv, N, causal)
BENCH_SHAPES = [(8, 32, 8, 2048), (2, 32, 8, 8192)]  # causal, D = 128
D = 128


def tflops(B, Hq, N, ms, causal=True):
    return 4 * B * Hq * N * N * D / (2 if causal else 1) / (ms * 1e-3) / 1e12


def inputs(B, Hq, Hkv, N, dtype, seed=0):
    import torch
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(B, h, N, D, device="cuda", dtype=dtype, generator=g) for h in (Hq, Hkv, Hkv)]


def reference(q, k, v, causal, scale):
    """float32 o from SDPA and float32 base-2 lse from explicit scores (B, Hq, N, N)."""
    import torch
    import torch.nn.functional as F
    qf, kf, vf = q.float(), k.float(), v.float()
    o = F.scaled_dot_product_attention(qf, kf, vf, is_causal=causal, scale=scale, enable_gqa=True)
    kr = kf.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # (B, Hq, N, D)
    s = qf @ kr.transpose(-1, -2) * scale  # (B, Hq, N, N)
    if causal:
        n = q.shape[2]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return o, torch.logsumexp(s, -1) * LOG2E


def check_variant(name):
    """Correctness on CHECK_SHAPES, then timing on BENCH_SHAPES, for one variant (runs in a subprocess)."""
    import torch
    import triton
    from dist_moe.kernels.flash_attention_gluon import flash_attention_forward_gluon
    cfg = VARIANTS[name]
    ok = True
    for B, Hq, Hkv, N, causal in CHECK_SHAPES:
        q, k, v = inputs(B, Hq, Hkv, N, torch.bfloat16)
        scale = D ** -0.5
        o, lse = flash_attention_forward_gluon(q, k, v, causal, scale, config=cfg)
        torch.cuda.synchronize()
        o_ref, lse_ref = reference(q, k, v, causal, scale)
        err_o = ((o.float() - o_ref).abs() / (1 + o_ref.abs())).max().item()
        err_l = (lse - lse_ref).abs().max().item()
        good = err_o < 2e-2 and err_l < 1e-2 and bool(torch.isfinite(o).all())
        ok &= good
        print(f"  [{name}] B={B} Hq={Hq} Hkv={Hkv} N={N} causal={causal}: o rel err {err_o:.2e}, lse err {err_l:.2e}"
              f" {'PASS' if good else 'FAIL'}", flush=True)
    for B, Hq, Hkv, N in BENCH_SHAPES:
        q, k, v = inputs(B, Hq, Hkv, N, torch.bfloat16)
        ms = triton.testing.do_bench(lambda: flash_attention_forward_gluon(q, k, v, True, D ** -0.5, config=cfg))
        print(f"  [{name}] TIME B={B} Hq={Hq} Hkv={Hkv} N={N}: {ms:.3f} ms {tflops(B, Hq, N, ms):.0f} TF/s", flush=True)
    print(f"  [{name}] {'ALL PASS' if ok else 'SOME FAIL'}", flush=True)


def cross_check_triton(name):
    """lse and o of one variant against our Triton forward at (2, 8, 2, 2048) causal (same autotune bucket as the
    first bench shape, so no new tuning)."""
    import torch
    import dist_moe.kernels.flash_attention as fa
    from dist_moe.kernels.flash_attention import _forward as triton_forward
    from dist_moe.kernels.flash_attention_gluon import flash_attention_forward_gluon
    fa.GLUON = False  # flash_attention itself runs the Gluon forward on Hopper: compare with the Triton one
    q, k, v = inputs(2, 8, 2, 2048, torch.bfloat16, seed=1)
    o, lse = flash_attention_forward_gluon(q, k, v, True, D ** -0.5, config=VARIANTS[name])
    o_t, lse_t = triton_forward(q, k, v, True, 0, D ** -0.5)
    err_l = (lse - lse_t).abs().max().item()
    err_o = (o.float() - o_t.float()).abs().max().item()
    good = err_l < 1e-2 and err_o < 2e-2
    print(f"  [{name}] vs Triton forward: lse max diff {err_l:.2e}, o max diff {err_o:.2e} {'PASS' if good else 'FAIL'}",
          flush=True)


def baselines():
    """Our Triton forward (autotuned, forward only) and SDPA cuDNN, same shapes."""
    import torch
    import torch.nn.functional as F
    import triton
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import dist_moe.kernels.flash_attention as fa
    from dist_moe.kernels.flash_attention import flash_attention
    fa.GLUON = False  # time the Triton forward, which flash_attention replaces by the Gluon one on Hopper
    for B, Hq, Hkv, N in BENCH_SHAPES:
        q, k, v = inputs(B, Hq, Hkv, N, torch.bfloat16)
        with torch.no_grad():
            flash_attention(q, k, v, True)  # autotune outside the timing
            ms = triton.testing.do_bench(lambda: flash_attention(q, k, v, True))
        print(f"  [triton] TIME B={B} Hq={Hq} Hkv={Hkv} N={N}: {ms:.3f} ms {tflops(B, Hq, N, ms):.0f} TF/s", flush=True)
        try:
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                try:
                    F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
                    fn = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
                    how = "enable_gqa"
                except RuntimeError:
                    kr, vr = (x.repeat_interleave(Hq // Hkv, dim=1) for x in (k, v))
                    fn = lambda: F.scaled_dot_product_attention(q, kr, vr, is_causal=True)
                    how = "repeated k/v"
                ms = triton.testing.do_bench(fn)
            print(f"  [cudnn] TIME B={B} Hq={Hq} Hkv={Hkv} N={N}: {ms:.3f} ms {tflops(B, Hq, N, ms):.0f} TF/s ({how})",
                  flush=True)
        except Exception as e:  # noqa: BLE001 (report and go on)
            print(f"  [cudnn] B={B} N={N}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--one", help="run a single variant in this process (used by the parent)")
    ap.add_argument("--xcheck", help="compare a variant with the Triton forward in this process (used by the parent)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of VARIANTS")
    ap.add_argument("--timeout", type=int, default=120, help="seconds per variant subprocess")
    args = ap.parse_args()
    if args.one or args.xcheck:
        check_variant(args.one) if args.one else cross_check_triton(args.xcheck)
        return
    import torch
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    passed = [name for name in args.variants.split(",") if run_child(["--one", name], name, args.timeout)]
    try:
        baselines()
    except Exception as e:  # noqa: BLE001
        print(f"baselines FAILED {type(e).__name__}: {str(e)[:500]}", flush=True)
    if passed:
        run_child(["--xcheck", passed[0]], passed[0], args.timeout)


def run_child(flags, name, timeout):
    """Run this script with flags in a subprocess; print its output; True if it exited cleanly with no FAIL."""
    print(f"{' '.join(flags)}: {VARIANTS[name]}", flush=True)
    t0 = time.time()
    try:
        r = subprocess.run([sys.executable, __file__, *flags], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        print(out + f"  [{name}] TIMEOUT after {timeout} s (deadlock?)", flush=True)
        return False
    print(r.stdout, end="", flush=True)
    if r.returncode != 0:
        print(f"  [{name}] FAILED (exit {r.returncode}): ...{r.stderr[-1500:]}", flush=True)
    print(f"  [{name}] {time.time() - t0:.0f} s", flush=True)
    return r.returncode == 0 and "FAIL" not in r.stdout


if __name__ == "__main__":
    main()
