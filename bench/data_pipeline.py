"""The data pipeline's throughput on CPU. Sections (`--only`):

- sampler: the tokens per second one rank's `MixtureSampler.next_batch` hands a training step (the quota, the
  generator, one copy per row out of the memmapped shards, the int64 tensors), which must stay far above what
  a GPU consumes (the medium preset trains at about 160k tokens/s per GPU). Synthetic uint16 shards of three
  sources are written to the work dir and read once first, so they are in the page cache (as on a node whose
  shards were just prepared or read before; a first read comes at the disk's speed); rank 0 of `world size`
  ranks then draws `--sampler-steps` batches after a warm-up.

Timings take the best of `--repeats` back to back, with the load average recorded beside them: the machine is
shared. Rows go to bench/results/<name>_cpu_<date>.jsonl and a markdown table beside it.

    python bench/data_pipeline.py --only sampler --name data_pipeline_sampler
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import run_meta, write_results  # noqa: E402  (bench/ is not a package)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from dist_moe.data.sampler import MixtureSampler  # noqa: E402

# (seq_len, micro batch, world size): 8 x 2048 (at least 200k tokens/s asked), the medium preset's micro batch,
# a long context, and a large global batch (the quota and the generator cover all ranks' rows)
SAMPLER_SHAPES = [(2048, 8, 8), (2048, 16, 8), (8192, 4, 8), (2048, 16, 512)]
SAMPLER_SOURCES = {"web": 0.7, "code": 0.2, "math": 0.1}


def load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def synthetic_shards(folder: Path, shards_per_source: int, shard_tokens: int) -> SimpleNamespace:
    """Random uint16 shards of every source, read once (into the page cache), and the manifest fields the
    sampler reads."""
    rng = np.random.default_rng(0)
    entries = []
    for source in range(len(SAMPLER_SOURCES)):
        for n in range(shards_per_source):
            file = f"shards/{source}-train-{n:05d}.bin"
            (folder / file).parent.mkdir(parents=True, exist_ok=True)
            rng.integers(0, 32000, size=shard_tokens, dtype=np.uint16).tofile(folder / file)
            np.fromfile(folder / file, dtype=np.uint16).sum()
            entries.append(SimpleNamespace(file=file, source=source, split="train", tokens=shard_tokens, sha256=""))
    sources = [SimpleNamespace(name=name, weight=weight) for name, weight in SAMPLER_SOURCES.items()]
    return SimpleNamespace(folder=folder, dtype="uint16", sources=sources, shards=entries)


def section_sampler(args, work: Path) -> list[dict]:
    manifest = synthetic_shards(work / "sampler", args.sampler_shards, args.sampler_shard_tokens)
    rows = []
    for seq_len, micro_batch, world_size in SAMPLER_SHAPES:
        sampler = MixtureSampler(manifest, "train", seq_len, micro_batch, seed=0, rank=0, world_size=world_size)
        for _ in range(20):  # warm-up
            sampler.next_batch()
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            for _ in range(args.sampler_steps):
                sampler.next_batch()
            times.append((time.perf_counter() - start) / args.sampler_steps)
        rows.append(dict(section="sampler", seq_len=seq_len, micro_batch=micro_batch, world_size=world_size,
                         shards=len(manifest.shards), ms_per_batch=min(times) * 1e3,
                         tokens_per_s_per_rank=seq_len * micro_batch / min(times), load_avg=load_average()))
    shutil.rmtree(work / "sampler")
    return rows


SECTIONS = {"sampler": section_sampler}


def table(rows: list[dict], meta: dict, args) -> str:
    lines = [f"# Data pipeline on CPU, {meta['date']}", "",
             f"Machine: {meta['machine']}, {meta['cpus']} cores; python {platform.python_version()}, numpy "
             f"{meta['numpy']}.", f"Command: `{meta['command']}`", "",
             f"The machine is shared (see the load averages): every time is the best of {args.repeats} back to back.",
             ""]
    if any(r["section"] == "sampler" for r in rows):
        lines += [f"Sampler: {len(SAMPLER_SOURCES)} sources ({', '.join(f'{n} {w}' for n, w in SAMPLER_SOURCES.items())}"
                  f"), {args.sampler_shards} uint16 shards of {args.sampler_shard_tokens:,} tokens each per source, "
                  f"in the page cache; {args.sampler_steps} batches of rank 0 per timing.", ""]
    for name in SECTIONS:
        part = [r for r in rows if r["section"] == name]
        if part:
            lines += [f"## {name}", "", _markdown(part), ""]
    return "\n".join(lines)


def _markdown(rows: list[dict]) -> str:
    keys = [k for k in rows[0] if k != "section"]
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    return "\n".join(["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
                     + ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows])


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {list(SECTIONS)}")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sampler-steps", type=int, default=200, help="sampler: batches per timing")
    parser.add_argument("--sampler-shards", type=int, default=4, help="sampler: shards per source")
    parser.add_argument("--sampler-shard-tokens", type=int, default=16 * 2**20, help="sampler: tokens per shard")
    parser.add_argument("--work-dir", default="", help="scratch files (default: a temp dir)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--name", default="data_pipeline", help="results file stem (a section run on its own)")
    args = parser.parse_args()
    unknown = set(args.only.split(",")) - set(SECTIONS)
    if unknown:
        parser.error(f"--only: unknown section(s) {sorted(unknown)}; expected some of {list(SECTIONS)}")
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="dmbench-work", dir="/tmp"))
    meta = run_meta(gpu="cpu", machine=cpu_model(), numpy=np.__version__, cpus=str(os.cpu_count()),
                    load_avg_start=load_average())
    rows = []
    for name in args.only.split(","):
        rows += SECTIONS[name](args, work)
    write_results(args.out, args.name, meta, rows, table(rows, meta, args))
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
