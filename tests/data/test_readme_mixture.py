"""The README tour's mixture as a user runs it: tests/data/example_sources.py writes a .jsonl.zst file and a
Parquet folder, `dist-moe data prepare` prepares them, and `dist-moe train` trains on the 3:1 mixture, logging
each source's val loss and drawing each source's tokens in the weights' proportion."""

import json
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def tour_lines() -> list[list[str]]:
    """The three README lines that name /tmp/mix, split as a shell would."""
    lines = [line for line in (ROOT / "README.md").read_text().splitlines() if "/tmp/mix" in line]
    assert [line.split()[1] for line in lines] == ["tests/data/example_sources.py", "data", "train"], lines
    return [shlex.split(line, comments=True) for line in lines]


def test_the_readme_mixture_prepares_and_trains_in_proportion(tmp_path):
    make, prepare, train = [[arg.replace("/tmp/mix", str(tmp_path / "mix")) for arg in line] for line in tour_lines()]
    cli = [sys.executable, "-m", "dist_moe.cli"]
    subprocess.run([sys.executable, str(ROOT / make[1]), *make[2:], "--mb", "0.5"], check=True, timeout=120)
    cache = f"data.cache_dir={tmp_path / 'cache'}"
    prepared = subprocess.run([*cli, *prepare[1:], cache], capture_output=True, text=True, timeout=600)
    assert prepared.returncode == 0, prepared.stderr[-2000:]
    assert "from 2 source(s)" in prepared.stdout
    run_dir = tmp_path / "run"
    args = [a for a in train[2:] if not a.startswith("train.max_steps=")]
    trained = subprocess.run([*cli, "train", *args, cache, "train.max_steps=8", "train.eval_batches=2", "log.every=8",
                              f"run_dir={run_dir}"], capture_output=True, text=True, timeout=900)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "data: prepared at" in trained.stdout  # the shards prepare wrote are found, not built again
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = {k: v for row in rows if row["step"] == 8 for k, v in row.items()}
    assert {"val/loss/web", "val/loss/books", "val/loss"} <= final.keys()
    assert abs(final["val/loss"] - (0.75 * final["val/loss/web"] + 0.25 * final["val/loss/books"])) < 1e-5
    web, books = final["data/tokens/web"], final["data/tokens/books"]
    assert web + books == 8 * 16 * 128 and abs(web / (web + books) - 0.75) < 0.02
