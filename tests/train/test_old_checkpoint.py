"""A checkpoint written by an older dist_moe resumes bit for bit, on the data that run prepared: the losses after it
equal those the old code recorded when it resumed the same checkpoint (fixtures/checkpoint_2026-12-07/README.md)."""

import json
import shutil
import subprocess
from pathlib import Path

from cli_runs import command, losses

FIXTURE = Path(__file__).parent / "fixtures" / "checkpoint_2026-12-07"


def test_checkpoint_from_before_issue_38_resumes_bit_for_bit(tmp_path, cache_dir):
    shutil.copytree(FIXTURE, tmp_path / "old")
    record_path = tmp_path / "old" / "run" / "data.json"  # the old cache's paths, where the copy now holds it
    record = json.loads(record_path.read_text())
    for split in ("train", "val"):
        record[f"{split}_path"] = str(tmp_path / "old" / "prepared" / f"{split}.bin")
    record_path.write_text(json.dumps(record))
    expected = json.loads((FIXTURE / "expected.json").read_text())
    # cwd: the run's config names its corpus and run dir relative to the folder it was made in
    result = subprocess.run(command("resume", "run", f"train.max_steps={expected['resume_to']}", cache_dir=cache_dir),
                            cwd=tmp_path / "old", capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    assert "resumed from" in result.stdout and "at step 4" in result.stdout
    run = tmp_path / "old" / "run"
    assert {str(step): loss for step, loss in losses(run).items() if step > 4} == expected["train/loss"]
    assert losses(run, "val/loss")[expected["resume_to"]] == expected["val/loss"]
