"""The data pipeline (`dist_moe.data.prepare`) against its peers, on CPU. Sections (`--only`):

- tokenize: one worker's tokenize stage (`units.tokenize_unit`: read .jsonl, tokenize, write shards) against raw
  sentencepiece `encode` of the same documents held in memory, both pinned to the same core (target >= 0.85x);
  and Hugging Face `datasets.map(batched, num_proc=N)` with the same tokenizer against the Ray tokenize stage
  with N workers (N = 1, 2);
- scaling: the Ray Data scan and tokenize stages with 1 and 2 workers on a local Ray (target >= 1.7x);
- rss: `prepare` of a synthetic .jsonl.zst corpus on a local Ray, the peak RSS (VmHWM) of the driver and of
  every Ray worker, at `--rss-gb` sizes (target < 1 GiB each, flat as the corpus doubles);
- cluster: the scaling section on a three-node network-namespace cluster (head + two 1-CPU nodes; needs root),
  2 workers, then node 2 killed, 1 worker;
- sampler: the tokens per second one rank's `MixtureSampler.next_batch` hands a training step (the quota, the
  generator, one copy per row out of the memmapped shards, the int64 tensors), which must stay far above what
  a GPU consumes (the medium preset trains at about 160k tokens/s per GPU); synthetic uint16 shards of three
  sources, read once first (in the page cache), rank 0 of `world size` ranks draws `--sampler-steps` batches.

Timings take the best of `--repeats` back to back, with the load average recorded beside them: on a shared
machine the ratios mean more than the MB/s. The synthetic text is the interpreter's standard library cut into
paragraphs and reassembled at random (each document numbered, so deduplication keeps them all).

    python bench/data_pipeline.py                          # every section -> bench/results/data_pipeline_cpu_<date>.*
    python bench/data_pipeline.py --only tokenize,scaling --corpus-mb 8 --repeats 1   # a smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import run_meta, write_results  # noqa: E402  (bench/ is not a package)

from dist_moe.config import DataConfig, SourceConfig  # noqa: E402
from dist_moe.data import prepare  # noqa: E402
from dist_moe.data.manifest import Manifest, ShardEntry, SourceEntry  # noqa: E402
from dist_moe.data.prepare import make_plan  # noqa: E402
from dist_moe.data.sampler import MixtureSampler  # noqa: E402
from dist_moe.data.sources import iter_source, read_documents  # noqa: E402
from dist_moe.data.tokenizer import Tokenizer  # noqa: E402
from dist_moe.data.units import tokenize_unit, work_file  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MB = 1e6
SAMPLER_SHAPES = [(2048, 8, 8), (2048, 16, 8), (8192, 4, 8), (2048, 16, 512)]
SAMPLER_SOURCES = {"web": 0.7, "code": 0.2, "math": 0.1}


# ---- synthetic corpus


def synthetic_documents(seed: int, pool_mb: float = 8.0):
    """Endless documents of 3-10 stdlib paragraphs drawn at random, each headed by its number and seed."""
    paragraphs = [p for _, text in iter_source("stdlib", max_mb=pool_mb) for p in text.split("\n\n") if p.strip()]
    rng = random.Random(seed)
    n = 0
    while True:
        yield f"# document {seed}-{n}\n" + "\n\n".join(rng.sample(paragraphs, rng.randint(3, 10))) + "\n"
        n += 1


def write_jsonl(path: Path, docs, mb: float) -> None:
    """`mb` MB of text as .jsonl (.zst when the name says so), streamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as raw, _compressed(raw, path.name.endswith(".zst")) as out:
        written = 0
        while written < mb * MB:
            text = next(docs)
            out.write((json.dumps({"text": text}) + "\n").encode())
            written += len(text.encode())


@contextlib.contextmanager
def _compressed(raw, zst: bool):
    if not zst:
        yield raw
        return
    import zstandard

    with zstandard.ZstdCompressor(level=3).stream_writer(raw, closefd=False) as out:
        yield out


# ---- shared helpers


def load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def best_of(repeats: int, fn) -> tuple[float, str]:
    """The shortest wall time of `repeats` calls of fn(), and the load average at the last one."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), load_average()


@contextlib.contextmanager
def local_ray(cpus: int):
    import ray

    temp = tempfile.mkdtemp(prefix="dmbench", dir="/tmp")  # short: Ray's socket paths live under it
    ray.init(num_cpus=cpus, include_dashboard=False, _node_ip_address="127.0.0.1", _temp_dir=temp,
             log_to_driver=False, configure_logging=False)
    try:
        yield
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


def bench_corpus(args, work: Path) -> tuple[DataConfig, Path]:
    """The timing corpus (one plain .jsonl of `--corpus-mb` MB, cut into units of `--unit-mb`), prepared once
    in-process: its tokenizer, scan and codes are what the timed stages read."""
    path = work / "corpus" / "bench.jsonl"
    if not path.is_file():
        write_jsonl(path, synthetic_documents(seed=0), args.corpus_mb)
    cfg = DataConfig(sources=[SourceConfig(str(path))], cache_dir=str(work / "cache"), shard_mb=args.unit_mb,
                     max_corpus_mb=0, tokenizer_sample_mb=4, ray_threshold_mb=1e9)
    return cfg, prepare(cfg, show_progress=False)


def stage_seconds(cfg: DataConfig, folder: Path, repeats: int) -> dict:
    """Best wall time of the Ray scan stage and of the Ray tokenize stage over every unit, on the Ray this
    process is connected to (the stages' actors start inside the timing, as in `prepare`)."""
    from dist_moe.data.prepare import sample_rate
    from dist_moe.data.ray_stages import ScanUnits, TokenizeUnits, run_stage

    plan = make_plan(cfg)
    noop = lambda docs, num_bytes: None  # noqa: E731

    def scan():
        for unit in plan.units:
            work_file(folder, "scan", unit.index, "json").unlink(missing_ok=True)  # else the scan is skipped
        run_stage(ScanUnits, {"folder": str(folder), "sample_rate": sample_rate(plan, 4)}, plan.units, noop)

    tokenize_kwargs = {"folder": str(folder), "shard_bytes": int(cfg.shard_mb * MB)}
    scan_s, scan_load = best_of(repeats, scan)
    tokenize_s, load = best_of(repeats, lambda: run_stage(TokenizeUnits, tokenize_kwargs, plan.units, noop))
    return {"scan_s": scan_s, "tokenize_s": tokenize_s, "units": len(plan.units), "load_avg": load}


def corpus_text_mb(cfg: DataConfig) -> float:
    """MB of document text (UTF-8) in the corpus: what every MB/s here is of."""
    return sum(len(t.encode()) for u in make_plan(cfg).units for p in u.parts
               for t in read_documents(p, u.text_key)) / MB


# ---- sections


def section_tokenize(args, work: Path) -> list[dict]:
    """One worker's tokenize stage against raw sentencepiece on the same core; HF datasets.map num_proc=N."""
    cfg, folder = bench_corpus(args, work)
    plan = make_plan(cfg)
    texts = [t for u in plan.units for p in u.parts for t in read_documents(p, u.text_key)]
    text_mb = sum(len(t.encode()) for t in texts) / MB
    core = min(os.sched_getaffinity(0))
    allowed = os.sched_getaffinity(0)
    rows = []
    os.sched_setaffinity(0, {core})
    try:
        tokenizer = Tokenizer(folder / "tokenizer.model", threads=1)
        sp = tokenizer._sp
        batches = _text_batches(texts)
        raw_s, raw_load = best_of(args.repeats, lambda: [sp.encode(b, num_threads=1) for b in batches])
        ours_s, ours_load = best_of(args.repeats, lambda: [
            tokenize_unit(folder, u, tokenizer, int(cfg.shard_mb * MB)) for u in plan.units])
    finally:
        os.sched_setaffinity(0, allowed)
    rows.append(dict(section="tokenize", impl="sentencepiece encode (in memory, 1 thread)", workers=1,
                     seconds=raw_s, mb_per_s=text_mb / raw_s, text_mb=text_mb, load_avg=raw_load))
    rows.append(dict(section="tokenize", impl="dist_moe tokenize_unit (1 worker, reads + writes shards)",
                     workers=1, seconds=ours_s, mb_per_s=text_mb / ours_s, text_mb=text_mb, load_avg=ours_load,
                     vs_raw=raw_s / ours_s))
    for n in args.workers:
        hf_s, hf_load = hf_map_seconds(cfg, folder / "tokenizer.model", n, work, args.repeats)
        rows.append(dict(section="tokenize", impl=f"datasets.map(num_proc={n})", workers=n, seconds=hf_s,
                         mb_per_s=text_mb / hf_s, text_mb=text_mb, load_avg=hf_load))
    return rows


def _text_batches(texts: list[str]) -> list[list[str]]:
    """The documents in batches of about 1 MB of text, as the tokenize stage encodes them."""
    batches, batch, size = [], [], 0
    for text in texts:
        batch.append(text)
        size += len(text)
        if size >= 1_000_000:
            batches.append(batch)
            batch, size = [], 0
    return batches + [batch] if batch else batches


class _HFEncode:
    """datasets.map's function: sentencepiece loaded once per process, from the path (pickled, not the model)."""

    def __init__(self, path: str):
        self.path, self.sp = path, None

    def __getstate__(self):
        return {"path": self.path, "sp": None}

    def __call__(self, batch: dict) -> dict:
        if self.sp is None:
            import sentencepiece as spm

            self.sp = spm.SentencePieceProcessor(model_file=self.path)
        return {"ids": self.sp.encode(batch["text"], num_threads=1)}


def hf_map_seconds(cfg: DataConfig, tokenizer: Path, num_proc: int, work: Path, repeats: int) -> tuple[float, str]:
    """Best time of `Dataset.map(batched=True, num_proc=N)` over the corpus's documents (the dataset loaded
    from the same .jsonl once, outside the timing; nothing cached between repeats)."""
    import datasets

    datasets.disable_progress_bars()
    dataset = datasets.load_dataset("json", data_files=cfg.sources[0].path, split="train",
                                    cache_dir=str(work / "hf"))
    encode = _HFEncode(str(tokenizer))
    return best_of(repeats, lambda: dataset.map(encode, batched=True, batch_size=1000, num_proc=num_proc,
                                                remove_columns=["text"], load_from_cache_file=False,
                                                cache_file_name=str(work / "hf" / f"map-{num_proc}.arrow")))


def section_scaling(args, work: Path) -> list[dict]:
    """The Ray scan and tokenize stages with 1, then 2 workers (a local Ray of that many CPUs)."""
    cfg, folder = bench_corpus(args, work)
    text_mb = corpus_text_mb(cfg)
    rows = []
    for n in args.workers:
        with local_ray(n):
            timing = stage_seconds(cfg, folder, args.repeats)
        rows.append(dict(section="scaling", where="local Ray", workers=n, text_mb=text_mb,
                         scan_mb_per_s=text_mb / timing["scan_s"], tokenize_mb_per_s=text_mb / timing["tokenize_s"],
                         **timing))
    return with_speedups(rows)


def with_speedups(rows: list[dict]) -> list[dict]:
    base = rows[0]
    for row in rows:
        row["tokenize_speedup"] = base["tokenize_s"] / row["tokenize_s"]
        row["scan_speedup"] = base["scan_s"] / row["scan_s"]
    return rows


def section_cluster(args, work: Path) -> list[dict]:
    """The scaling section on a netns cluster: the driver runs inside the head's namespace (this script with
    --stage-driver), 2 workers; then node 2 is killed and the same with 1 worker."""
    sys.path.insert(0, str(ROOT / "tests" / "cluster"))
    from netns_cluster import GCS_PORT, NetnsCluster, netns_unavailable

    reason = netns_unavailable()
    if reason:
        print(f"cluster section skipped: {reason}", flush=True)
        return []
    cfg, folder = bench_corpus(args, work)
    text_mb = corpus_text_mb(cfg)
    cluster = NetnsCluster(num_nodes=3, cpus_per_node=1)
    rows = []
    try:
        cluster.start()
        address = f"{cluster.ips[0]}:{GCS_PORT}"
        for workers in (2, 1):
            if workers == 1:
                cluster.kill_node(2)
                cluster.wait_for(lambda: cluster.alive_nodes() == 2, 120, "node 2 to be dead")
            done = cluster.exec([sys.executable, __file__, "--stage-driver", address, "--work-dir", str(work),
                                 "--corpus-mb", str(args.corpus_mb), "--unit-mb", str(args.unit_mb),
                                 "--repeats", str(args.repeats)], capture_output=True, text=True, timeout=1200,
                                cwd=ROOT)
            if done.returncode != 0:
                raise RuntimeError(f"stage driver failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
            timing = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(dict(section="cluster", where="netns cluster (head + 1-CPU nodes)", text_mb=text_mb,
                             scan_mb_per_s=text_mb / timing["scan_s"],
                             tokenize_mb_per_s=text_mb / timing["tokenize_s"], **timing))
    finally:
        cluster.close()
    return with_speedups(sorted(rows, key=lambda r: r["workers"]))


def stage_driver(args, work: Path) -> None:
    """Inside the head's namespace: connect to the cluster, time the stages, print one JSON line."""
    import ray

    cfg, folder = bench_corpus(args, work)
    ray.init(address=args.stage_driver, log_to_driver=False, configure_logging=False)
    workers = int(ray.cluster_resources().get("CPU", 0))
    print(json.dumps(dict(workers=workers, **stage_seconds(cfg, folder, args.repeats))), flush=True)


def section_rss(args, work: Path) -> list[dict]:
    """`prepare` of --rss-gb GB of .jsonl.zst (files of 128 MB of text, each file a source of weight 1; the 4 GB
    corpus holds the 2 GB one), in a child process on a local Ray of 2 CPUs; peak RSS per process from /proc/<pid>/status VmHWM, polled
    every 0.5 s over the child's whole process tree (raylet, Ray workers), so no process's peak is missed
    unless it lives under 0.5 s. The corpus is deleted after."""
    corpus = Path(tempfile.mkdtemp(prefix="dmbench-corpus", dir="/tmp"))
    rows = []
    try:
        for gb in sorted(args.rss_gb):
            files = int(round(gb * 1000 / 128))
            docs = synthetic_documents(seed=1)
            for i in range(files):
                path = corpus / f"part-{i:04d}.jsonl.zst"
                if not path.is_file():
                    write_jsonl(path, docs, 128)
            sources = json.dumps([str(corpus / f"part-{i:04d}.jsonl.zst") for i in range(files)])
            rows.append(dict(section="rss", corpus_gb=gb, files=files,
                             zst_mb=sum((corpus / f"part-{i:04d}.jsonl.zst").stat().st_size
                                        for i in range(files)) / MB,
                             **peak_rss_of_prepare(sources, work / f"rss-{gb}")))
            print(json.dumps(rows[-1]), flush=True)
    finally:
        shutil.rmtree(corpus, ignore_errors=True)
    return rows


PREPARE_CHILD = """
import json, sys, time
from dist_moe.config import DataConfig, SourceConfig
from dist_moe.data import prepare
import ray
ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", _temp_dir=sys.argv[3],
         log_to_driver=False, configure_logging=False)
start = time.perf_counter()
cfg = DataConfig(sources=[SourceConfig(p) for p in json.loads(sys.argv[1])], cache_dir=sys.argv[2], max_corpus_mb=0,
                 shard_mb=64, ray_threshold_mb=0)
folder = prepare(cfg, show_progress=True)
print(json.dumps({"seconds": time.perf_counter() - start, "folder": str(folder)}), flush=True)
ray.shutdown()
"""


def peak_rss_of_prepare(sources: str, cache: Path) -> dict:
    import psutil

    temp = tempfile.mkdtemp(prefix="dmbrss", dir="/tmp")
    child = subprocess.Popen([sys.executable, "-c", PREPARE_CHILD, sources, str(cache), temp],
                             stdout=subprocess.PIPE, text=True, cwd=ROOT)
    peaks: dict[int, tuple[str, int]] = {}
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            try:
                tree = [psutil.Process(child.pid)] + psutil.Process(child.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                return
            for proc in tree:
                with contextlib.suppress(psutil.Error, OSError, ValueError):
                    hwm = _vm_hwm(proc.pid)
                    name = "driver" if proc.pid == child.pid else " ".join(proc.cmdline())[:80]
                    peaks[proc.pid] = (name, max(hwm, peaks.get(proc.pid, ("", 0))[1]))
            stop.wait(0.5)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    out, _ = child.communicate()
    stop.set()
    poller.join()
    shutil.rmtree(temp, ignore_errors=True)
    if child.returncode != 0:
        raise RuntimeError(f"prepare failed ({child.returncode}): {out[-2000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    shutil.rmtree(result["folder"], ignore_errors=True)
    stage = lambda word: [v for n, v in peaks.values() if word in n]  # noqa: E731
    return dict(seconds=result["seconds"], driver_mib=stage("driver")[0] / 2**20,
                scan_worker_mib=max(stage("ScanUnits"), default=0) / 2**20,
                tokenize_worker_mib=max(stage("TokenizeUnits"), default=0) / 2**20,
                other_ray_mib=max((v for n, v in peaks.values() if n != "driver" and "Units" not in n), default=0)
                / 2**20, processes=len(peaks), load_avg=load_average())


def _vm_hwm(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


# a section: (args, work dir) -> result rows, each with its "section"; `--only` picks them by name


# ---- sampler


def synthetic_shards(folder: Path, shards_per_source: int, shard_tokens: int) -> Manifest:
    """Random uint16 shards of every source, read once (into the page cache), as a manifest the sampler reads."""
    rng = np.random.default_rng(0)
    shards = []
    for source in range(len(SAMPLER_SOURCES)):
        for n in range(shards_per_source):
            file = f"shards/{source}-train-{n:05d}.bin"
            (folder / file).parent.mkdir(parents=True, exist_ok=True)
            rng.integers(0, 32000, size=shard_tokens, dtype=np.uint16).tofile(folder / file)
            np.fromfile(folder / file, dtype=np.uint16).sum()
            shards.append(ShardEntry(file=file, index="", source=source, split="train", tokens=shard_tokens,
                                     documents=1, bytes=2 * shard_tokens, sha256="", unit=0))
    sources = [SourceEntry(name=name, path=name, weight=weight, text_key="text", documents=0, duplicates=0,
                           train_tokens=shards_per_source * shard_tokens, val_tokens=0)
               for name, weight in SAMPLER_SOURCES.items()]
    return Manifest(key="synthetic", tokenizer_sha256="", vocab_size=32000, eos_id=1, dtype="uint16", sources=sources,
                    shards=shards, unigram_entropy_nats=0.0, settings={}, folder=folder)


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


SECTIONS = {"tokenize": section_tokenize, "scaling": section_scaling, "rss": section_rss, "cluster": section_cluster,
            "sampler": section_sampler}


# ---- report


def table(rows: list[dict], meta: dict, args) -> str:
    commands = list(dict.fromkeys(r["command"] for r in rows))
    rows = [dict(r, run=commands.index(r["command"]) + 1) for r in rows]
    lines = [f"# Data pipeline on CPU, {meta['date']}", "",
             f"Machine: {meta['machine']}, {meta['cpus']} cores; python {platform.python_version()}, "
             f"ray {meta['ray']}, sentencepiece {meta['sentencepiece']}, datasets {meta['datasets']}.",
             "Commands (a row's `run` numbers its command):",
             *[f"{i}. `{c}`" for i, c in enumerate(commands, start=1)], "",
             "The machine is shared (2 cores, other jobs running: see the load averages): every time is the best of "
             f"{args.repeats} back to back, and the ratios between rows of one section mean more than the MB/s. "
             "MB = 10^6 bytes of document text (UTF-8). Ray stage times include starting the stage's actors "
             "(each imports dist_moe and loads the tokenizer), as in `prepare`. rss: one run per size, peak RSS "
             "= VmHWM from /proc/<pid>/status polled every 0.5 s over the whole process tree of the preparing "
             "process (driver, raylet, Ray workers); MiB = 2^20 bytes.", ""]
    for name in SECTIONS:
        part = [r for r in rows if r["section"] == name]
        if part:
            lines += [f"## {name}", "", _markdown(part), ""]
    return "\n".join(lines)


def _markdown(rows: list[dict]) -> str:
    keys = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in ("section", "command")]
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    return "\n".join(["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
                     + ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows])


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def _measured(row: dict, meta: dict) -> dict:
    """A row of earlier results without the run metadata, but with the command that measured it."""
    return {k: v for k, v in row.items() if k not in meta or k in ("command", "load_avg")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {list(SECTIONS)}")
    parser.add_argument("--corpus-mb", type=float, default=32, help="MB of text in the timing corpus")
    parser.add_argument("--unit-mb", type=float, default=4, help="data.shard_mb of the timing corpus (its units)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rss-gb", type=float, nargs="+", default=[2, 4], help="corpus sizes (GB of text)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sampler-steps", type=int, default=200, help="sampler: batches per timing")
    parser.add_argument("--sampler-shards", type=int, default=4, help="sampler: shards per source")
    parser.add_argument("--sampler-shard-tokens", type=int, default=16 * 2**20, help="sampler: tokens per shard")
    parser.add_argument("--work-dir", default="", help="keeps the timing corpus between runs (default: a temp dir)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--name", default="data_pipeline", help="results file stem (a section run on its own)")
    parser.add_argument("--report", nargs="+", default=[], metavar="JSONL",
                        help="no runs: one report from the rows of earlier results (sections run apart)")
    parser.add_argument("--stage-driver", default="", help=argparse.SUPPRESS)  # the cluster section's driver
    args = parser.parse_args()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="dmbench-work", dir="/tmp"))
    if args.stage_driver:
        return stage_driver(args, work)
    unknown = set(args.only.split(",")) - set(SECTIONS)
    if unknown:
        parser.error(f"--only: unknown section(s) {sorted(unknown)}; expected some of {list(SECTIONS)}")
    import datasets
    import ray
    import sentencepiece

    meta = run_meta(gpu="cpu", machine=cpu_model(), ray=ray.__version__, sentencepiece=sentencepiece.__version__,
                    datasets=datasets.__version__, cpus=str(os.cpu_count()), load_avg_start=load_average())
    rows = [_measured(json.loads(line), meta) for path in args.report for line in Path(path).read_text().splitlines()]
    for name in [] if args.report else args.only.split(","):
        done = [dict(r, command=meta["command"]) for r in SECTIONS[name](args, work)]
        with open(work / "rows.jsonl", "a") as f:  # each section's rows kept as it ends (for --report)
            f.writelines(json.dumps(dict(meta, **r)) + "\n" for r in done)
        rows += done
    write_results(args.out, args.name, meta, rows, table(rows, meta, args))
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
