"""End-to-end training on one GPU: tokens/s, MFU, and where a step's device time goes.

Runs the real worker body (`dist-moe train PRESET key=value...`, i.e. train.loop.run) and wraps its
train_step so that torch.profiler records `--active` steps after `--skip` warm-up steps, with the device
synchronised at each recorded step's end, and times the DeepSpeed engine's forward, backward and step calls
in those steps (synchronising around each). As soon as those steps are done it prints and writes
(bench/results/train_profile_<gpu>_<date>[_<tag>].md) the measured bf16 matmul ceiling (8192^3), wall time
per step and per engine call, peak memory, device time per step by kernel family (flash attention, the MoE
layer's grouped GEMMs, the LM-head cross-entropy, other GEMMs, NCCL, the rest), idle time and the top
kernels, then exits (no final eval or checkpoint). The loop's own tokens/s and MFU lines come above it; MFU
counts 6*N_active + 12*L*d_attn*S FLOPs per token (BENCHMARKS.md).
    python bench/train_profile.py medium train.max_steps=20 data.max_corpus_mb=20 [--skip 14 --active 3 --tag x]
"""
import argparse
import datetime
import os
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dist_moe import cli  # noqa: E402
from dist_moe.train import loop  # noqa: E402

FAMILIES = [("flash attention", r"attn|attention"), ("MoE grouped GEMMs", r"grouped_mm|weight_grad|GroupProblemShape"),
            ("LM-head cross-entropy", r"cross_entropy|SoftMax|nll_loss"),
            ("other GEMMs", r"gemm|nvjet|xmma|cutlass|cublas"), ("NCCL", r"nccl"),
            ("MoE permute / SwiGLU / router", r"swiglu|scatter_rows|gather_sum|route|router"),
            ("optimizer (foreach, multi-tensor)", r"foreach|multi_tensor")]


def family(name: str) -> str:
    return next((label for label, pattern in FAMILIES if re.search(pattern, name, re.IGNORECASE)), "other")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("items", nargs="*", help="preset and key=value overrides, as for dist-moe train")
    parser.add_argument("--skip", type=int, default=14, help="steps before the profiled ones")
    parser.add_argument("--active", type=int, default=3, help="profiled steps")
    parser.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--tag", default="", help="suffix of the result file's name")
    args = parser.parse_intermixed_args()

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ceiling = 2 * 8192 ** 3 / triton.testing.do_bench(lambda: a @ a, return_mode="median") * 1e-9
    del a

    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA],
                                  schedule=torch.profiler.schedule(wait=args.skip, warmup=1, active=args.active,
                                                                   repeat=1))
    step_ends, original = [], loop.train_step
    last = args.skip + 1 + args.active  # train steps skip + 2 .. last are recorded (the profiler's active ones)

    def profiled_step(*step_args, **kwargs):
        out = original(*step_args, **kwargs)
        if len(step_ends) + 1 >= args.skip + 1:
            torch.cuda.synchronize()  # each recorded step's kernels end inside it
        step_ends.append(time.perf_counter())
        prof.step()
        if len(step_ends) == last:  # report and end here: the run's final eval and checkpoint are not measured
            prof.stop()
            report(prof, (step_ends[-1] - step_ends[-1 - args.active]) * 1e3 / args.active, ceiling, args)
            os._exit(0)
        return out

    loop.train_step = profiled_step
    time_engine_calls(lambda: args.skip + 1 <= len(step_ends) < last)
    prof.start()
    cli.main(["train", *args.items])


PHASE_MS: dict[str, float] = defaultdict(float)


def time_engine_calls(recording) -> None:
    """Wrap DeepSpeedEngine.forward/backward/step with synchronised timers while recording() is true."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    for name in ("forward", "backward", "step"):
        original = getattr(DeepSpeedEngine, name)

        def timed(self, *a, _original=original, _name=name, **kw):
            if not recording():
                return _original(self, *a, **kw)
            torch.cuda.synchronize()
            start = time.perf_counter()
            out = _original(self, *a, **kw)
            torch.cuda.synchronize()
            PHASE_MS[_name] += (time.perf_counter() - start) * 1e3
            return out

        setattr(DeepSpeedEngine, name, timed)


def report(prof, wall_ms: float, ceiling: float, args) -> None:
    per_family, per_kernel = defaultdict(float), defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            ms = event.time_range.elapsed_us() / 1e3 / args.active
            per_family[family(event.name)] += ms
            per_kernel[event.name[:90]] += ms
    busy = sum(per_family.values())
    gpu, date = torch.cuda.get_device_name(), datetime.date.today().isoformat()
    lines = [f"# Training step profile, {date}", "",
             f"GPU: {gpu}; torch {torch.__version__}, triton {triton.__version__}; bf16 matmul 8192^3: "
             f"{ceiling:.0f} TFLOP/s.", "", f"Command: `python bench/train_profile.py {' '.join(sys.argv[1:])}`", "",
             f"Wall time per step (device synchronised): {wall_ms:.1f} ms; device busy {busy:.1f} ms "
             f"({busy / wall_ms:.0%}); idle {wall_ms - busy:.1f} ms. Peak memory allocated: "
             f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB.", "",
             "Engine calls per step (wall, synchronised): " + ", ".join(
                 f"{name} {ms / args.active:.1f} ms" for name, ms in PHASE_MS.items()) + ".", "",
             "| kernel family | ms per step | share of wall |", "|---|---|---|"]
    lines += [f"| {label} | {ms:.1f} | {ms / wall_ms:.0%} |"
              for label, ms in sorted(per_family.items(), key=lambda kv: -kv[1])]
    lines += ["", "| top kernels | ms per step |", "|---|---|"]
    lines += [f"| `{name}` | {ms:.2f} |" for name, ms in sorted(per_kernel.items(), key=lambda kv: -kv[1])[:25]]
    tag = f"_{args.tag}" if args.tag else ""
    out = Path(args.out_dir) / f"train_profile_{gpu.lower().replace(' ', '_')}_{date}{tag}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
