"""A checkpoint from elsewhere never runs code: a pickle planted in any file of a checkpoint (one that would
create a file when unpickled) is refused in one line naming that file, by resume, generate, DPO and export,
before DeepSpeed's own loader (which unpickles anything) sees it, and the planted call never runs."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from cli_runs import SMALL, dist_moe
from dist_moe.cli import export_run
from dist_moe.errors import CheckpointError
from dist_moe.train import checkpoint

FILE_KINDS = ["trainer_rank0.pt", "mp_rank_00_model_states.pt", "layer_1_expert_3_mp_rank_00_model_states.pt",
              "zero_pp_rank_0_mp_rank_00_optim_states.pt", "portable_optim_rank0.pt"]


class Plant:
    """Unpickled, it calls open(marker, "w") (pickled as io.open): the file appears only if a load ran it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir):
    run_dir = tmp_path_factory.mktemp("untrusted") / "run"
    result = dist_moe("train", *SMALL, "train.max_steps=1", "train.eval_every=1000", "train.zero_stage=1",
                      f"run_dir={run_dir}", cache_dir=cache_dir)  # ZeRO: its optimizer files hold DeepSpeed's classes
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def planted_copy(trained, tmp_path, file_name):
    """A copy of the run whose checkpoint file `file_name` also holds a Plant; returns (run dir, marker)."""
    run_dir, marker = tmp_path / "run", tmp_path / "ran"
    shutil.copytree(trained, run_dir)
    file = checkpoint.candidates(run_dir)[0] / file_name
    state = torch.load(file, weights_only=False)  # our own file, trusted here
    state["planted"] = Plant(marker)
    torch.save(state, file)
    return run_dir, marker


def assert_refused_in_one_line(result, file_name, marker):
    assert result.returncode == 2, (result.stdout[-2000:], result.stderr[-3000:])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and file_name in errors[0] and "io.open" in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert not marker.exists()


def test_our_checkpoints_pass_the_weights_only_reader(trained):
    ckpt = checkpoint.candidates(trained)[0]
    checkpoint.check_files(ckpt)
    state = checkpoint.load_file(ckpt / "trainer_rank0.pt")
    assert state["step"] == 1 and state["rng"]["numpy"][1].dtype == "uint32"  # numpy's RNG state comes back


@pytest.mark.parametrize("file_name", FILE_KINDS)
def test_a_planted_pickle_in_any_file_is_refused_without_running(trained, tmp_path, file_name):
    run_dir, marker = planted_copy(trained, tmp_path, file_name)
    ckpt = checkpoint.candidates(run_dir)[0]
    with pytest.raises(CheckpointError) as refused:
        checkpoint.check_files(ckpt)
    message = str(refused.value)
    assert "\n" not in message and file_name in message and "io.open" in message
    assert not marker.exists()


def test_export_refuses_a_planted_pickle(trained, tmp_path):
    run_dir, marker = planted_copy(trained, tmp_path, "mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointError, match="mp_rank_00_model_states.pt: refused"):
        export_run(run_dir, tmp_path / "hf")
    assert not marker.exists() and not (tmp_path / "hf").exists()


@pytest.mark.slow
def test_resume_refuses_a_planted_pickle_in_deepspeeds_file(trained, tmp_path, cache_dir):
    run_dir, marker = planted_copy(trained, tmp_path, "mp_rank_00_model_states.pt")
    result = dist_moe("resume", str(run_dir), "train.max_steps=2", cache_dir=cache_dir)
    assert_refused_in_one_line(result, "mp_rank_00_model_states.pt", marker)
    assert checkpoint.candidates(run_dir)  # refused, not set aside as if it were torn


@pytest.mark.slow
def test_generate_refuses_a_planted_pickle_in_an_expert_file(trained, tmp_path):
    run_dir, marker = planted_copy(trained, tmp_path, "layer_0_expert_1_mp_rank_00_model_states.pt")
    result = subprocess.run([sys.executable, "-m", "dist_moe.cli", "generate", str(run_dir), "--max-new-tokens", "2"],
                            capture_output=True, text=True, timeout=600)
    assert_refused_in_one_line(result, "layer_0_expert_1_mp_rank_00_model_states.pt", marker)


@pytest.mark.slow
def test_dpo_refuses_a_planted_pickle_in_its_parent(trained, tmp_path, cache_dir):
    run_dir, marker = planted_copy(trained, tmp_path, "mp_rank_00_model_states.pt")
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps({"prompt": f"def f{i}(x):\n", "chosen": f"    return x + {i}\n",
                                         "rejected": f"    retrun x ++ {i}\n"}) + "\n" for i in range(8)))
    result = dist_moe("dpo", str(run_dir), f"data.prefs={prefs}", "train.micro_batch_size=4", "train.max_steps=1",
                      f"run_dir={tmp_path / 'dpo'}", cache_dir=cache_dir)
    assert_refused_in_one_line(result, "mp_rank_00_model_states.pt", marker)
