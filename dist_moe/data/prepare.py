"""Preparation: sources -> tokenizer -> token shards + manifest, in `<cache_dir>/<key>/`.

Stages, each over work units (a run of one source's files of about `shard_mb`, or a byte range of a big
.jsonl): scan (hash every document, keep a tokenizer sample), the driver's split (exact deduplication and
the train/val choice, by document hash), tokenizer training on the sample, tokenize (shards). Below
`data.ray_threshold_mb` the units run in this process; above, as Ray Data `map_batches` stages with one
sentencepiece per worker, on a local Ray or `cluster.address`. Both run the same functions (units.py), so
they write the same files. The key hashes the file listing (paths, sizes, mtimes) and the settings; the
manifest, written last, makes the folder complete. docs/data.md tells the whole story.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
from tqdm import tqdm

from dist_moe.atomic import atomic_output
from dist_moe.data.corpus import DataError
from dist_moe.data.manifest import (MANIFEST_FORMAT, Manifest, ShardEntry, SourceEntry, file_sha256, load_manifest,
                                    shard_problem, token_dtype, write_manifest)
from dist_moe.data.sources import Part, Source, list_parts, source_names, sources_of
from dist_moe.data.tokenizer import TOKENIZER_FORMAT, Tokenizer, train_tokenizer
from dist_moe.data.units import (DUPLICATE, TRAIN, VAL, WorkUnit, finished_unit, hash_fractions, sample_texts,
                                 scan_unit, tokenize_unit, work_file)


@dataclass(frozen=True)
class Plan:
    folder: Path
    sources: list[Source]
    units: list[WorkUnit]
    settings: dict

    @property
    def bytes(self) -> int:
        return sum(u.bytes for u in self.units)


def prepare(data_cfg, cluster_cfg=None, show_progress: bool = True, tokenizer: Optional[Path] = None,
            verify: bool = False) -> Path:
    """The prepared folder for `data_cfg`, building whatever is missing or bad (shards are checked by size,
    and by content with `verify`). `tokenizer`: a sentencepiece model to use instead of training one."""
    plan = make_plan(data_cfg, tokenizer)
    manifest = load_manifest(plan.folder)
    if manifest is not None:
        bad = [p for p in (shard_problem(plan.folder, s, verify) for s in manifest.shards) if p]
        if not bad:
            _say(f"data: prepared at {plan.folder}", show_progress)
            _say(_describe_tokens(manifest), show_progress)
            return plan.folder
        _say(f"data: {len(bad)} bad shard(s) ({bad[0]}, ...), rebuilding them", show_progress)
        (plan.folder / "manifest.json").unlink()
    _say(f"data: preparing {plan.bytes / 1e6:.1f} MB from {len(plan.sources)} source(s) in {len(plan.units)} "
         f"unit(s) into {plan.folder}", show_progress)
    in_process = plan.bytes < data_cfg.ray_threshold_mb * 1e6
    with (_InProcess() if in_process else _OnRay(cluster_cfg)) as runner:
        scans = runner.scan(plan, show_progress)
        counts = assign_splits(plan, data_cfg.val_fraction, data_cfg.dedup)
        _say(_describe_scan(plan, scans, counts), show_progress)
        _ensure_tokenizer(plan, data_cfg, tokenizer, show_progress)
        # after a kill, a finished unit's shards are hashed before they are trusted; after a manifest whose
        # shards were checked just now, only with `verify`
        done = runner.tokenize(plan, verify=verify or manifest is None, show_progress=show_progress)
    manifest = _manifest(plan, done, counts)
    write_manifest(plan.folder, manifest)
    _say(_describe_tokens(manifest), show_progress)
    return plan.folder


def _describe_tokens(manifest: Manifest) -> str:
    """The token counts and the unigram entropy: the loss a model that ignores context gets, the baseline."""
    return (f"data: {manifest.tokens('train'):,} train and {manifest.tokens('val'):,} val tokens in "
            f"{len(manifest.shards)} shard(s); unigram entropy {manifest.unigram_entropy_nats:.3f} nats/token "
            "(the loss to beat)")


def make_plan(data_cfg, tokenizer: Optional[Path] = None) -> Plan:
    """The sources' files cut into work units, and the folder their key names (nothing read but the listing)."""
    sources = sources_of(data_cfg)
    unit_bytes = int(data_cfg.shard_mb * 1e6)
    units: list[WorkUnit] = []
    listing = []
    for index, source in enumerate(sources):
        parts = list_parts(source, data_cfg.max_corpus_mb)
        listing.append([asdict(source), [[p.file.path, p.file.size, p.file.mtime_ns, p.start, p.end] for p in parts]])
        for group in _group_parts(parts, unit_bytes):
            units.append(WorkUnit(len(units), index, source.text_key, tuple(group)))
    settings = {"vocab_size": int(data_cfg.vocab_size), "tokenizer_sample_mb": float(data_cfg.tokenizer_sample_mb),
                "val_fraction": float(data_cfg.val_fraction), "dedup": bool(data_cfg.dedup),
                "shard_mb": float(data_cfg.shard_mb), "max_corpus_mb": float(data_cfg.max_corpus_mb),  # 0 == 0.0
                "tokenizer": file_sha256(Path(tokenizer)) if tokenizer else f"bpe-{TOKENIZER_FORMAT}"}
    key_text = json.dumps({"format": MANIFEST_FORMAT, "listing": listing, "settings": settings}, sort_keys=True)
    key = hashlib.sha256(key_text.encode()).hexdigest()[:16]
    folder = Path(data_cfg.cache_dir).expanduser().resolve() / key
    return Plan(folder, sources, units, settings)


def _group_parts(parts: list[Part], unit_bytes: int) -> Iterator[list[Part]]:
    """Consecutive parts of about `unit_bytes` together; a plain .jsonl or a Parquet file larger than that in
    byte ranges (a range owns the lines, or row groups, that begin in it)."""
    group, size = [], 0
    for part in parts:
        splittable = part.file.path.endswith((".jsonl", ".parquet")) and part.end - part.start > unit_bytes
        pieces = ([Part(part.file, s, min(s + unit_bytes, part.end)) for s in range(part.start, part.end, unit_bytes)]
                  if splittable else [part])
        for piece in pieces:
            if group and size + piece.end - piece.start > unit_bytes:
                yield group
                group, size = [], 0
            group.append(piece)
            size += piece.end - piece.start
    if group:
        yield group


def assign_splits(plan: Plan, val_fraction: float, dedup: bool) -> list[dict]:
    """Each document's code (train, val, duplicate) into work/codes-<unit>.npy; per source {documents,
    duplicates}. A document is val when its hash's split fraction is under val_fraction (every document of a
    weight-0 source), so the split depends on the text only, not on order or parallelism; a source left
    without val (or train) documents gets its lowest (highest) one there. Deduplication keeps the first
    copy in unit order and holds a set of the 16-byte hashes of the unique documents (about 100 bytes each)."""
    seen: set[bytes] = set()
    counts = [{"documents": 0, "duplicates": 0} for _ in plan.sources]
    codes: dict[int, np.ndarray] = {}
    ends: dict[int, list] = {}  # per source: [(lowest fraction, unit, row), (highest, unit, row)] of kept docs
    for unit in plan.units:
        hashes = np.load(work_file(plan.folder, "scan", unit.index, "npy"))
        split, _ = hash_fractions(hashes)
        held_out = plan.sources[unit.source].weight == 0
        code = np.where(held_out | (split < val_fraction), VAL, TRAIN).astype(np.uint8)
        if dedup:
            for row, h in enumerate(map(bytes, hashes)):
                code[row] = DUPLICATE if h in seen else code[row]
                seen.add(h)
        kept = np.flatnonzero(code != DUPLICATE)
        if kept.size:
            low, high = (int(kept[np.argmin(split[kept])]), int(kept[np.argmax(split[kept])]))
            old = ends.get(unit.source, [(2.0, 0, 0), (-1.0, 0, 0)])
            ends[unit.source] = [min(old[0], (float(split[low]), unit.index, low)),
                                 max(old[1], (float(split[high]), unit.index, high))]
        counts[unit.source]["documents"] += int(kept.size)
        counts[unit.source]["duplicates"] += int(code.size - kept.size)
        codes[unit.index] = code
    for index, source in enumerate(plan.sources):
        _check_split(source, counts[index]["documents"])
        units = [codes[u.index] for u in plan.units if u.source == index]
        for code, (_, unit, row) in ((VAL, ends[index][0]), (TRAIN, ends[index][1])):
            if not any(np.any(c == code) for c in units) and (code == VAL or source.weight > 0):
                codes[unit][row] = code
    for unit in plan.units:
        with atomic_output(work_file(plan.folder, "codes", unit.index, "npy")) as tmp, open(tmp, "wb") as f:
            np.save(f, codes[unit.index])
    return counts


def _check_split(source: Source, documents: int) -> None:
    needed = 1 if source.weight == 0 else 2
    if documents < needed:
        raise DataError(f"source '{source.path}': {documents} document(s) after deduplication, "
                        f"{'a held-out source needs 1' if needed == 1 else 'a train/val split needs at least 2'} "
                        "(in a text file, separate documents by blank lines)")


def _ensure_tokenizer(plan: Plan, data_cfg, tokenizer: Optional[Path], show_progress: bool) -> None:
    path = plan.folder / "tokenizer.model"
    if path.is_file():
        return
    if tokenizer is not None:
        with atomic_output(path) as tmp:
            shutil.copyfile(tokenizer, tmp)
        return
    train_tokenizer(sample_texts(plan.folder, plan.units), data_cfg.vocab_size, data_cfg.tokenizer_sample_mb,
                    path, show_progress)


def sample_rate(plan: Plan, sample_mb: float) -> float:
    """The share of documents the scan keeps for the tokenizer, chosen by hash: spread over every source and
    file, a little over `sample_mb` (on-disk bytes; compressed sources give more text)."""
    return min(1.0, 1.1 * sample_mb * 1e6 / max(plan.bytes, 1))


def _manifest(plan: Plan, done: list[dict], counts: list[dict]) -> Manifest:
    tokenizer = Tokenizer(plan.folder / "tokenizer.model")
    shards = [ShardEntry(**s) for record in done for s in record["shards"]]
    token_counts = sum(np.load(plan.folder / record["counts"]) for record in done)
    p = token_counts[token_counts > 0] / token_counts.sum()
    sources = []
    for index, (source, name) in enumerate(zip(plan.sources, source_names(plan.sources))):
        tokens = {split: sum(s.tokens for s in shards if s.source == index and s.split == split)
                  for split in ("train", "val")}
        sources.append(SourceEntry(name=name, path=source.path,
                                   weight=source.weight, text_key=source.text_key, **counts[index],
                                   train_tokens=tokens["train"], val_tokens=tokens["val"]))
    return Manifest(key=plan.folder.name, tokenizer_sha256=file_sha256(tokenizer.path),
                    vocab_size=tokenizer.vocab_size, eos_id=tokenizer.eos_id,
                    dtype=token_dtype(tokenizer.vocab_size).name, sources=sources, shards=shards,
                    unigram_entropy_nats=float(-(p * np.log(p)).sum()), settings=plan.settings)


def _describe_scan(plan: Plan, scans: list[dict], counts: list[dict]) -> str:
    lines = []
    for index, source in enumerate(plan.sources):
        skipped = [name for s in scans if plan.units[s["unit"]].source == index for name in s["skipped"]]
        note = f", {len(skipped)} file(s) skipped, not UTF-8 text: {', '.join(skipped[:3])}" if skipped else ""
        lines.append(f"source {index} '{source.path}' (weight {source.weight:g}): {counts[index]['documents']:,} "
                     f"documents, {counts[index]['duplicates']:,} duplicate(s) dropped{note}")
    return "\n".join(lines)


@contextmanager
def _progress(desc: str, total_bytes: int, enabled: bool) -> Iterator:
    """A tqdm line of MB, MB/s and ETA, with the documents done; the callback is units.Progress."""
    bar = tqdm(total=total_bytes, desc=desc, unit="B", unit_scale=True,
               disable=not enabled or not sys.stderr.isatty())
    documents = 0

    def update(docs: int, num_bytes: int) -> None:
        nonlocal documents
        documents += docs
        bar.set_postfix(documents=f"{documents:,}", refresh=False)
        bar.update(num_bytes)

    try:
        yield update
    finally:
        bar.close()


class _InProcess:
    """The stages in this process, unit after unit."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def scan(self, plan: Plan, show_progress: bool) -> list[dict]:
        rate = sample_rate(plan, plan.settings["tokenizer_sample_mb"])
        with _progress("scanning", plan.bytes, show_progress) as update:
            return [scan_unit(plan.folder, unit, rate, update) for unit in plan.units]

    def tokenize(self, plan: Plan, verify: bool, show_progress: bool) -> list[dict]:
        tokenizer = Tokenizer(plan.folder / "tokenizer.model")
        shard_bytes = int(plan.settings["shard_mb"] * 1e6)
        records = []
        with _progress("tokenizing", plan.bytes, show_progress) as update:
            for unit in plan.units:
                record = finished_unit(plan.folder, unit.index, verify)
                if record is None:
                    record = tokenize_unit(plan.folder, unit, tokenizer, shard_bytes, update)
                else:
                    update(0, unit.bytes)
                records.append(record)
        return records


class _OnRay:
    """The stages as Ray Data `map_batches` over the work units (ray_stages.py), on the Ray this process is
    connected to, else `cluster.address`, else a local Ray started here and stopped after."""

    def __init__(self, cluster_cfg):
        self.address = getattr(cluster_cfg, "address", "") if cluster_cfg is not None else ""
        self.started = False

    def __enter__(self):
        import ray

        if not ray.is_initialized():
            ray.init(address=self.address or None, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
            self.started = True
        return self

    def __exit__(self, *exc) -> None:
        if self.started:
            import ray

            ray.shutdown()

    def scan(self, plan: Plan, show_progress: bool) -> list[dict]:
        from dist_moe.data.ray_stages import ScanUnits, run_stage

        rate = sample_rate(plan, plan.settings["tokenizer_sample_mb"])
        with _progress("scanning", plan.bytes, show_progress) as update:
            return run_stage(ScanUnits, {"folder": str(plan.folder), "sample_rate": rate}, plan.units, update)

    def tokenize(self, plan: Plan, verify: bool, show_progress: bool) -> list[dict]:
        from dist_moe.data.ray_stages import TokenizeUnits, run_stage

        finished = {u.index: finished_unit(plan.folder, u.index, verify) for u in plan.units}
        pending = [u for u in plan.units if finished[u.index] is None]
        with _progress("tokenizing", plan.bytes, show_progress) as update:
            update(0, sum(u.bytes for u in plan.units if finished[u.index] is not None))
            kwargs = {"folder": str(plan.folder), "shard_bytes": int(plan.settings["shard_mb"] * 1e6)}
            for record in run_stage(TokenizeUnits, kwargs, pending, update) if pending else []:
                finished[record["unit"]] = record
        return [finished[u.index] for u in plan.units]


def _say(message: str, enabled: bool) -> None:
    if enabled:
        print(message, flush=True)
