"""What every benchmark writes: one JSONL row per measurement, each with the run's date, GPU, versions and
command, and one markdown table, as results/<name>_<gpu>_<date>.jsonl and .md."""
import datetime
import json
import re
import shlex
import sys
from pathlib import Path

import torch
import triton


def run_meta(gpu: str = "", command: str = "", **versions: str) -> dict:
    """date, gpu (this process's CUDA device unless given), torch and triton versions, any others, command."""
    return dict(date=datetime.date.today().isoformat(), gpu=gpu or torch.cuda.get_device_name(),
                torch=torch.__version__, triton=triton.__version__, **versions,
                command=command or "python " + shlex.join(sys.argv))


def write_results(out_dir: str, name: str, meta: dict, rows: list[dict], table: str) -> None:
    """Writes the rows (meta added to each) and the table, then prints the table."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{name}_{re.sub('[^a-z0-9]+', '_', meta['gpu'].lower())}_{meta['date']}"
    (out / f"{stem}.jsonl").write_text("".join(json.dumps(dict(meta, **row)) + "\n" for row in rows))
    (out / f"{stem}.md").write_text(table)
    print(table, flush=True)
