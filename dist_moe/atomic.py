"""Atomic file output: a file under its final name is always complete.

Every file written whole into a run dir or a data cache (config, summary, tokenizer, shards, meta, the
checkpoints' `latest` pointer, a truncated metrics.jsonl) goes through `atomic_output`, so a run killed
mid-write leaves at most a hidden temp file behind, never a truncated file that looks valid. Streams that
grow (metrics.jsonl, rank logs, TensorBoard events) are appended to instead; a metrics line torn by a kill
is skipped when it is read back.
"""

from __future__ import annotations

import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; when the block succeeds, flush it to disk and rename it onto `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)
