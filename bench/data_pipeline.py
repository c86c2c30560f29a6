"""The data pipeline's throughput, by section (--only picks some): `sampler` is the tokens per second one rank's
MixtureSampler hands a training step (next_batch: the quota, the generator, one copy per row out of the
memmapped shards, the int64 tensors), which must stay far above what a GPU consumes (the medium preset trains
at about 160k tokens/s per GPU).

The sampler section writes synthetic uint16 shards of several sources (manifest entries as the prepared folder
lists them) into a scratch folder, reads them once (so they are in the page cache, as on a node whose shards
were just prepared or read before; a cold read is the disk's speed) and times rank 0 of world_size ranks
drawing `--steps` batches, after a warm-up. Writes JSONL + a markdown table beside the other results.

    python bench/data_pipeline.py [--only sampler] [--out-dir bench/results]
"""
import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from results_io import run_meta, write_results  # bench/, beside this script

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dist_moe.data.sampler import MixtureSampler  # noqa: E402

# (seq_len, micro batch, world size): 8 x 2048 (at least 200k tokens/s asked), the medium preset's micro batch,
# a long context
# and a large global batch (the quota and the generator cover all ranks' rows: the part that grows with ranks)
SAMPLER_SHAPES = [(2048, 8, 8), (2048, 16, 8), (8192, 4, 8), (2048, 16, 512)]
SOURCES = {"web": 0.7, "code": 0.2, "math": 0.1}


def synthetic_shards(folder: Path, shards_per_source: int, shard_tokens: int) -> SimpleNamespace:
    """Random uint16 shards of every source in SOURCES, and the manifest fields the sampler reads."""
    rng = np.random.default_rng(0)
    entries = []
    for source in range(len(SOURCES)):
        for n in range(shards_per_source):
            file = f"shards/{source}-train-{n:05d}.bin"
            (folder / file).parent.mkdir(parents=True, exist_ok=True)
            rng.integers(0, 32000, size=shard_tokens, dtype=np.uint16).tofile(folder / file)
            entries.append(SimpleNamespace(file=file, source=source, split="train", tokens=shard_tokens, sha256=""))
    sources = [SimpleNamespace(name=name, weight=weight) for name, weight in SOURCES.items()]
    return SimpleNamespace(folder=folder, dtype="uint16", sources=sources, shards=entries)


def time_sampler(manifest, seq_len: int, micro_batch: int, world_size: int, steps: int) -> float:
    """Seconds per next_batch of rank 0: the median of 5 runs of `steps` batches, after a warm-up."""
    sampler = MixtureSampler(manifest, "train", seq_len, micro_batch, seed=0, rank=0, world_size=world_size)
    for _ in range(20):
        sampler.next_batch()
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(steps):
            sampler.next_batch()
        runs.append((time.perf_counter() - start) / steps)
    return float(np.median(runs))


def bench_sampler(args) -> tuple[list[dict], str]:
    rows = []
    with tempfile.TemporaryDirectory(dir=args.scratch) as scratch:
        manifest = synthetic_shards(Path(scratch), args.shards_per_source, args.shard_tokens)
        for entry in manifest.shards:  # into the page cache
            np.fromfile(Path(scratch) / entry.file, dtype=np.uint16).sum()
        for seq_len, micro_batch, world_size in SAMPLER_SHAPES:
            seconds = time_sampler(manifest, seq_len, micro_batch, world_size, args.steps)
            rows.append(dict(section="sampler", seq_len=seq_len, micro_batch=micro_batch, world_size=world_size,
                             sources=len(SOURCES), shards=len(manifest.shards), shard_tokens=args.shard_tokens,
                             ms_per_batch=seconds * 1e3, tokens_per_s=seq_len * micro_batch / seconds))
    table = ["## sampler: tokens/s one rank's MixtureSampler hands a step (rank 0, page cache warm)", "",
             f"{len(SOURCES)} sources ({', '.join(f'{n} {w}' for n, w in SOURCES.items())}), "
             f"{len(manifest.shards)} uint16 shards of {args.shard_tokens:,} tokens; median of 5 x {args.steps} "
             "batches.", "", "| seq_len | micro batch | world size | ms / batch | tokens/s per rank |",
             "|---:|---:|---:|---:|---:|"]
    table += [f"| {r['seq_len']} | {r['micro_batch']} | {r['world_size']} | {r['ms_per_batch']:.3f} | "
              f"{r['tokens_per_s']:,.0f} |" for r in rows]
    return rows, "\n".join(table) + "\n"


SECTIONS = {"sampler": bench_sampler}


def cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=list(SECTIONS), default=list(SECTIONS), help="sections to run")
    parser.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--scratch", default=None, help="folder for the synthetic shards (default: the temp dir)")
    parser.add_argument("--steps", type=int, default=200, help="sampler: batches per timed run")
    parser.add_argument("--shards-per-source", type=int, default=4)
    parser.add_argument("--shard-tokens", type=int, default=16 * 2**20, help="tokens per synthetic shard")
    args = parser.parse_args()
    rows, tables = [], []
    for name in args.only:
        section_rows, table = SECTIONS[name](args)
        rows += section_rows
        tables.append(table)
    machine = f"{cpu_model()}, {os.cpu_count()} cores"
    meta = run_meta(gpu="cpu", machine=machine, numpy=np.__version__, sections=",".join(args.only))
    write_results(args.out_dir, "data_pipeline", meta, rows, "\n".join(tables))


if __name__ == "__main__":
    main()
