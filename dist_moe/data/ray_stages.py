"""The preparation's stages on Ray Data: the work units as items, each stage a `map_batches` over them with
a callable class (one per worker: the tokenizer is loaded once), one unit per batch. Each unit writes its
own files; what comes back to the driver is its small JSON record, streamed, never the tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

from dist_moe.data.tokenizer import Tokenizer
from dist_moe.data.units import Progress, WorkUnit, scan_unit, tokenize_unit


class ScanUnits:
    def __init__(self, folder: str, sample_rate: float):
        self.folder, self.sample_rate = Path(folder), sample_rate

    def __call__(self, batch: dict) -> dict:
        records = [scan_unit(self.folder, WorkUnit.from_json(u), self.sample_rate) for u in batch["unit"]]
        return {"record": [json.dumps(r) for r in records]}


class TokenizeUnits:
    def __init__(self, folder: str, shard_bytes: int):
        self.folder, self.shard_bytes = Path(folder), shard_bytes
        self.tokenizer = Tokenizer(self.folder / "tokenizer.model", threads=1)  # one core per worker

    def __call__(self, batch: dict) -> dict:
        records = [tokenize_unit(self.folder, WorkUnit.from_json(u), self.tokenizer, self.shard_bytes)
                   for u in batch["unit"]]
        return {"record": [json.dumps(r) for r in records]}


def run_stage(stage: type, kwargs: dict, units: list[WorkUnit], progress: Progress) -> list[dict]:
    """Run `stage` over `units` on as many workers as the cluster has CPUs (at most one per unit); the
    records in unit order, `progress` told (documents, bytes) as each unit finishes."""
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False
    workers = max(1, min(len(units), int(ray.cluster_resources().get("CPU", 1))))
    dataset = ray.data.from_items([{"unit": u.to_json()} for u in units], override_num_blocks=len(units))
    out = dataset.map_batches(stage, fn_constructor_kwargs=kwargs, batch_size=1, num_cpus=1,
                              compute=ray.data.ActorPoolStrategy(size=workers))
    by_index = {u.index: u for u in units}
    records = []
    for row in out.iter_rows():
        record = json.loads(row["record"])
        progress(record.get("documents", 0), by_index[record["unit"]].bytes)
        records.append(record)
    return sorted(records, key=lambda r: r["unit"])
