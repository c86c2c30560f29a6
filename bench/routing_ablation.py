"""Routing-policy ablation on the `tiny` preset, on CPU: every policy against the same baseline, equal steps.

Baseline: token choice, softmax scores, Switch aux loss, drop on overflow, no noise (the pre-issue-25 defaults).
Each variant changes one thing; every variant runs with three seeds. A run is `dist_moe.train.loop.run` on the
tiny preset, all runs in this one process (start-up dominates short runs on a shared CPU; the loop supports
several runs per process); its val loss comes from summary.json and its routing from the
expert-load scalars it logged (read back with dist_moe.analysis): over the last `--window` logs, max/mean
expert load (mean over layers), dropped and rerouted fractions of the routed assignments, and dead experts
(below 10% of the fair share in every one of those logs, summed over layers).

    OMP_NUM_THREADS=2 nice -n 19 python bench/routing_ablation.py   # -> bench/results/routing_ablation_cpu_<date>.*
    python bench/routing_ablation.py --steps 5 --seeds 1 --variants baseline reroute   # a smoke run
    # seeds in parallel processes, then one report from their rows:
    for s in 0 1 2; do python bench/routing_ablation.py --first-seed $s --seeds 1 --work-dir w$s & done; wait
    python bench/routing_ablation.py --report w0/rows.jsonl w1/rows.jsonl w2/rows.jsonl
The defaults are cut to what a 2-core CPU shared with other jobs finishes in about an hour: 40 steps of 4
sequences of 64 tokens, 2 eval batches. That separates policies by routing statistics, much less by loss.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import run_meta, write_results  # noqa: E402  (bench/ is not a package)

VARIANTS = {  # name -> overrides on top of the baseline
    "baseline": [],
    "reroute": ["moe.overflow=reroute"],
    "aux_free": ["moe.balance=aux_free"],
    "both": ["moe.balance=both"],
    "expert_choice": ["moe.routing=expert_choice", "moe.balance=none"],
    "sigmoid": ["moe.score=sigmoid"],
    "noise_learned": ["moe.noise=learned"],
    "noise_jitter": ["moe.noise=jitter"],
    "noise_rsample": ["moe.noise=rsample"],
}
BASELINE = ["moe.noise=none", "moe.overflow=drop", "moe.balance=aux", "moe.routing=token_choice", "moe.score=softmax"]
COMPARISONS = {  # which rows each question compares; the baseline is every question's first row
    "overflow": ["baseline", "reroute"],
    "balance": ["baseline", "aux_free", "both"],
    "routing": ["baseline", "expert_choice"],
    "score": ["baseline", "sigmoid"],
    "noise": ["baseline", "noise_learned", "noise_jitter", "noise_rsample"],
}
METRICS = ("val_loss", "max_over_mean", "dropped", "rerouted", "dead")


def run_one(variant: str, seed: int, args, root: Path) -> dict:
    from dist_moe.analysis.expert_load import DEAD_FRACTION_OF_FAIR_SHARE, read_history
    from dist_moe.config import load_config
    from dist_moe.train.loop import run

    run_dir = root / f"{variant}_s{seed}"
    cfg = load_config("tiny", [*BASELINE, *VARIANTS[variant], f"train.seed={seed}", f"train.max_steps={args.steps}",
                               f"train.micro_batch_size={args.batch}", f"data.seq_len={args.seq_len}",
                               f"train.eval_every={args.steps}", f"train.eval_batches={args.eval_batches}",
                               f"train.warmup_steps={max(1, args.steps // 10)}", f"log.every={args.steps}",
                               f"log.expert_every={max(1, args.steps // 8)}", "ckpt.keep=1", "train.device=cpu",
                               f"run_dir={run_dir}"])
    run(cfg)

    history = read_history(run_dir)
    recent = slice(-args.window, None)
    load = history.load[recent]  # (n, L, E)
    mean_load = np.nanmean(load, axis=0)  # (L, E)
    dead = int(((load < DEAD_FRACTION_OF_FAIR_SHARE / history.num_experts).all(axis=0)).sum())
    summary = json.loads((run_dir / "summary.json").read_text())
    rerouted = history.rerouted[recent]
    return dict(variant=variant, seed=seed, steps=args.steps, batch=args.batch, seq_len=args.seq_len,
                val_loss=summary["val_loss"],
                max_over_mean=float(np.mean(mean_load.max(axis=1) / mean_load.mean(axis=1))),
                dropped=float(np.nanmean(history.dropped[recent])),
                rerouted=float(np.nanmean(rerouted)) if not np.isnan(rerouted).all() else 0.0, dead=dead,
                completed=summary["completed"], overrides=VARIANTS[variant])


def table(rows: list[dict], args) -> str:
    by_variant = {v: [r for r in rows if r["variant"] == v] for v in VARIANTS}
    lines = [f"# Routing ablation: tiny preset, CPU, {args.steps} steps of {args.batch} x {args.seq_len} tokens, "
             f"{args.eval_batches} eval batches, "
             f"seeds {', '.join(map(str, args.seed_list))}",
             "", "mean ± std over seeds (population std); load, dropped and rerouted over the last "
             f"{args.window} expert-load logs; dead = experts below 10% of the fair share in each of them, "
             "summed over the 4 layers", ""]
    for question, names in COMPARISONS.items():
        lines += [f"## {question}", "", "| variant | val loss | max/mean load | dropped | rerouted | dead |",
                  "|---|---|---|---|---|---|"]
        for name in names:
            runs = by_variant.get(name) or []
            if not runs:
                continue
            cells = []
            for metric in METRICS:
                values = np.array([r[metric] for r in runs], dtype=float)
                fmt = "{:.2%} ± {:.2%}" if metric in ("dropped", "rerouted") else "{:.3f} ± {:.3f}"
                cells.append(fmt.format(values.mean(), values.std()))
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [v for v in VARIANTS if any(r["variant"] == v for r in rows)]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, metric, label in zip(axes, ("val_loss", "max_over_mean", "dropped"),
                                 ("val loss", "max/mean expert load", "dropped fraction")):
        values = [np.array([r[metric] for r in rows if r["variant"] == n]) for n in names]
        ax.bar(range(len(names)), [v.mean() for v in values], yerr=[v.std() for v in values], capsize=3,
               color=["grey"] + ["tab:blue"] * (len(names) - 1))
        for i, v in enumerate(values):
            ax.plot([i] * len(v), v, "k.", ms=4)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
        ax.set_title(label)
        if metric == "val_loss":
            low = min(v.min() for v in values)
            ax.set_ylim(low - 0.05, max(v.max() for v in values) + 0.05)
    fig.suptitle("routing ablation (tiny, CPU): mean ± std over seeds, dots = seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=4, help="sequences per step (the preset has 16)")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per sequence (the preset has 128)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds are 1337 + first_seed + i")
    parser.add_argument("--report", nargs="*", default=None, metavar="ROWS",
                        help="no runs: write the table and plot from these rows.jsonl files")
    parser.add_argument("--eval-batches", type=int, default=2)
    parser.add_argument("--window", type=int, default=3, help="expert-load logs the routing metrics average")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--work-dir", default=None, help="where the runs go (default: a temporary folder)")
    args = parser.parse_args()
    if args.report is not None:  # a run stopped early (SIGTERM saves and returns) does not count
        found = [json.loads(line) for path in args.report for line in Path(path).read_text().splitlines()]
        unique = {(r["variant"], r["seed"]): r for r in found if r.get("completed", np.isfinite(r["val_loss"]))}
        rows = list(unique.values())
        args.steps, args.batch, args.seq_len = rows[0]["steps"], rows[0]["batch"], rows[0]["seq_len"]
        args.seed_list = sorted({r["seed"] for r in rows})
    else:
        args.seed_list = [1337 + args.first_seed + i for i in range(args.seeds)]
        root = Path(args.work_dir or tempfile.mkdtemp(prefix="routing_ablation_"))
        rows = []
        for seed in args.seed_list:  # seed-major: a partial run still covers every variant
            for variant in args.variants:
                rows.append(run_one(variant, seed, args, root))
                with open(root / "rows.jsonl", "a") as f:
                    f.write(json.dumps(rows[-1]) + "\n")
    meta = run_meta(gpu="cpu")
    text = table(rows, args)
    write_results(args.out_dir, "routing_ablation", meta, rows, text)
    plot(rows, Path(args.out_dir) / f"routing_ablation_cpu_{meta['date']}.png")


if __name__ == "__main__":
    main()
