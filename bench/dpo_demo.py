"""DPO demo on CPU: pretrain `tiny` on the stdlib corpus, then `dist-moe dpo` on preference pairs built from
the same corpus, and record held-out reward accuracy before and after.

A pair: prompt = a few lines of a Python file; chosen = the lines that really follow; rejected = a run of
lines of about the same length from another file (--rejected other-file), or the chosen lines with their
words shuffled (--rejected shuffled). Usage:

    .venv/bin/python bench/dpo_demo.py --workdir runs/dpo_demo --out bench/results/dpo_tiny_cpu_DATE.md
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

from dist_moe.data.sources import iter_source


def code_lines(text: str) -> list[str]:
    return text.splitlines(keepends=True)


def take_lines(lines: list[str], start: int, max_chars: int) -> str:
    """Whole lines from `start` while they fit in max_chars."""
    out = ""
    for line in lines[start:]:
        if len(out) + len(line) > max_chars:
            break
        out += line
    return out


def build_pairs(count: int, seed: int, max_corpus_mb: float, rejected_kind: str) -> list[dict]:
    files = [code_lines(text) for path, text in iter_source("stdlib", max_corpus_mb)
             if path.endswith(".py") and len(text) > 2000]
    rng = random.Random(seed)
    pairs = []
    while len(pairs) < count:
        lines = rng.choice(files)
        start = rng.randrange(0, len(lines) - 12)
        prompt = take_lines(lines, start, 240)
        cut = start + len(code_lines(prompt))
        chosen = take_lines(lines, cut, 100)
        other = rng.choice(files)
        if other is lines:
            continue
        if rejected_kind == "other-file":
            rejected = take_lines(other, rng.randrange(0, len(other) - 6), len(chosen) + 10)
        else:
            words = chosen.split(" ")
            rng.shuffle(words)
            rejected = " ".join(words)
        if min(len(prompt.strip()), len(chosen.strip()), len(rejected.strip())) < 20 or chosen == rejected:
            continue
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return pairs


def dist_moe(*args: str) -> float:
    """Run one dist-moe command (its output to our stdout); returns its wall time in seconds."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dist_moe.cli", *args], check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="runs/dpo_demo")
    parser.add_argument("--out", required=True, help="the results page (.md); a .jsonl of the numbers beside it")
    parser.add_argument("--pairs", type=int, default=1000)
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--rejected", choices=("other-file", "shuffled"), default="other-file")
    parser.add_argument("--dpo", nargs="*", default=[], help="extra key=value for dist-moe dpo")
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    prefs = work / f"prefs-{args.rejected}.jsonl"
    prefs.write_text("".join(json.dumps(p) + "\n" for p in build_pairs(args.pairs, 0, 24, args.rejected)))
    base, tuned = work / "base", work / f"dpo-{args.rejected}"
    pretrain_s = 0.0
    if not (base / "summary.json").is_file():
        pretrain_s = dist_moe("train", "tiny", f"train.max_steps={args.pretrain_steps}", f"run_dir={base}")
    dpo_args = [f"data.prefs={prefs}", f"run_dir={tuned}", "dpo.val_fraction=0.1", *args.dpo]
    dpo_s = dist_moe("dpo", str(base), *dpo_args)
    rows = [json.loads(line) for line in (tuned / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/rewards/accuracies" in r]
    before, after = evals[0], evals[-1]
    summary = json.loads((tuned / "summary.json").read_text())
    base_summary = json.loads((base / "summary.json").read_text())
    base_rows = [json.loads(line) for line in (base / "metrics.jsonl").read_text().splitlines()]
    base_loss = [r["train/loss"] for r in base_rows if "train/loss" in r][-1]
    record = {"pairs": args.pairs, "rejected": args.rejected, "train_pairs": summary["train_pairs"],
              "held_out_pairs": summary["held_out_pairs"], "pretrain_steps": base_summary["step"],
              "base_train_loss": base_loss, "dpo_steps": summary["step"], "dpo_args": dpo_args[2:],
              "pretrain_seconds": round(pretrain_s, 1), "dpo_seconds": round(dpo_s, 1),
              "before": before, "after": after, "evals": evals}
    out = Path(args.out)
    out.with_suffix(".jsonl").write_text(json.dumps(record) + "\n")
    rejected = ("as many characters of lines from another file" if args.rejected == "other-file" else
                "the chosen lines with their words shuffled")
    pretrain_time = f", {pretrain_s / 60:.1f} min" if pretrain_s else ""
    lines = [
        f"# DPO demo: tiny on stdlib preference pairs (CPU, {time.strftime('%Y-%m-%d')})", "",
        f"`{' '.join(['.venv/bin/python', *sys.argv])}`", "",
        f"Pairs: {args.pairs} from the stdlib corpus (prompt: up to 240 characters of whole lines of a .py file; "
        f"chosen: the up to 100 characters of lines that follow; rejected: {rejected}), "
        f"{summary['held_out_pairs']} held out. Base: `tiny` pretrained for {base_summary['step']} steps "
        f"(train loss {base_loss:.3f}{pretrain_time}). DPO: `dist-moe dpo BASE "
        f"{' '.join(dpo_args[:1] + dpo_args[2:])}`, {summary['step']} steps in {dpo_s / 60:.1f} min on this "
        "machine's CPU (2 cores, shared with other jobs).", "",
        "| step | rewards/accuracies | rewards/margins | chosen more likely (logps) | eval loss |",
        "|---|---|---|---|---|",
    ]
    for r in evals:
        lines.append(f"| {r['step']} | {r['eval/rewards/accuracies']:.1%} | {r['eval/rewards/margins']:.3f} | "
                     f"{r['eval/logps/accuracies']:.1%} | {r['eval/loss']:.4f} |")
    lines += ["", "Step 0 is the pretrained model (policy = reference, so every reward is 0 and reward accuracy 0%); "
              "'chosen more likely' is how often the policy itself gives the real continuation the higher summed "
              "log-probability, the base model's own preference accuracy before DPO."]
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())


if __name__ == "__main__":
    main()
