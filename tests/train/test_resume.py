"""Resume: bit-for-bit continuation, kills during save, SIGTERM, and a different expert-parallel size."""

import json
import math
import shutil
import signal
import subprocess
import time

import pytest
import torch

from cli_runs import SMALL, command, dist_moe, losses
from dist_moe.train import checkpoint

STEPS = ["train.lr=1e-2", "train.eval_every=1000", "moe.noise=jitter"]  # noise: the router RNG must resume too


def refuse(constant):
    raise ValueError(f"not strict JSON: {constant}")


def assert_ok(result):
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])


# the EP=2 case also moves an aux-free selection bias every step (by the load of both ranks) and reroutes
# overflow: the bias must come back from the checkpoint bit for bit, or the routing and the losses drift
@pytest.mark.parametrize("nproc, extra", [(1, []), (2, ["moe.ep_size=2", "train.zero_stage=2", "moe.balance=aux_free",
                                                        "moe.bias_update_rate=0.05", "moe.overflow=reroute"])])
def test_stop_and_resume_gives_the_same_loss_at_every_step(tmp_path, cache_dir, nproc, extra):
    args = [*SMALL, *STEPS, *extra, f"--nproc={nproc}"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert_ok(dist_moe("train", *args, "train.max_steps=8", f"run_dir={straight}", cache_dir=cache_dir))
    assert_ok(dist_moe("train", *args, "train.max_steps=4", f"run_dir={split}", cache_dir=cache_dir))
    resumed = dist_moe("resume", str(split), "train.max_steps=8", f"--nproc={nproc}", cache_dir=cache_dir)
    assert_ok(resumed)
    assert "resumed from" in resumed.stdout and "at step 4" in resumed.stdout
    assert losses(split) == losses(straight)  # every step, exactly, fp32
    assert sorted(losses(split)) == list(range(1, 9))  # metrics.jsonl: no step missing or duplicated
    assert json.loads((split / "summary.json").read_text())["step"] == 8


def test_sigkill_while_writing_a_checkpoint_leaves_the_previous_one_usable(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    big = ["model.d_model=128", "moe.d_expert=512", "model.d_ff=512"]  # a save long enough to be caught in
    proc = subprocess.Popen(command("train", *SMALL, *STEPS, *big, "ckpt.every=2", "train.max_steps=400",
                                    f"run_dir={run_dir}", cache_dir=cache_dir),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    root, killed_at = run_dir / "checkpoints", None
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        partial = [p for p in root.glob("step_*.partial")] if root.is_dir() else []
        if partial and (root / "latest").exists():
            proc.send_signal(signal.SIGKILL)
            killed_at = partial[0]
            break
        time.sleep(0.002)
    proc.wait()
    assert killed_at is not None, "never caught a checkpoint being written"
    latest = (root / "latest").read_text().strip()
    assert int(latest.split("_")[1]) < int(killed_at.name.split("_")[1].split(".")[0])
    result = dist_moe("resume", str(run_dir), "train.max_steps=" + str(int(latest.split("_")[1]) + 2),
                      cache_dir=cache_dir)
    assert_ok(result)
    assert f"at step {int(latest.split('_')[1])}" in result.stdout
    assert not list(root.glob("*.partial"))  # the debris is cleaned by the next save


def tear(checkpoint_dir):
    states = checkpoint_dir / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[: states.stat().st_size // 2])  # a torn write


def test_corrupt_latest_checkpoint_falls_back_and_rotation_keeps_the_good_ones_and_a_failed_resume_changes_nothing(
        tmp_path, cache_dir):
    run_dir, root = tmp_path / "run", tmp_path / "run" / "checkpoints"
    assert_ok(dist_moe("train", *SMALL, *STEPS, "ckpt.every=2", "ckpt.keep=2", "train.max_steps=4",
                       f"run_dir={run_dir}", cache_dir=cache_dir))
    tear(root / "step_00000004")
    result = dist_moe("resume", str(run_dir), "train.max_steps=6", "ckpt.every=0", cache_dir=cache_dir)
    assert_ok(result)
    assert "step_00000004" in result.stderr and "unusable" in result.stderr
    assert "at step 2" in result.stdout
    # keep=2 after saving step 6: the torn step 4 is set aside (kept, not counted), good step 2 stays
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002", "step_00000004.unusable",
                                                      "step_00000006"]
    assert all(checkpoint.verify(root / name) is None for name in ("step_00000002", "step_00000006"))
    for good in checkpoint.complete_checkpoints(run_dir):
        tear(good)
    config_before = (run_dir / "config.yaml").read_bytes()
    failed = dist_moe("resume", str(run_dir), "train.max_steps=9", "train.lr=5e-3", cache_dir=cache_dir)
    assert failed.returncode == 2 and "no usable checkpoint" in failed.stderr, failed.stderr[-2000:]
    assert (run_dir / "config.yaml").read_bytes() == config_before
    assert [p.name for p in checkpoint.complete_checkpoints(run_dir)] == ["step_00000002", "step_00000006"]


def test_rotation_counts_only_checkpoints_up_to_the_one_saved(tmp_path):
    """An abandoned attempt's newer checkpoint (past the step the run resumed from) is neither kept nor deleted."""
    for step in (2, 4, 6, 8):
        (tmp_path / "checkpoints" / f"step_{step:08d}").mkdir(parents=True)
    saved = tmp_path / "checkpoints" / "step_00000006"
    assert [p.name for p in checkpoint.rotated_out(tmp_path, saved, keep=2)] == ["step_00000002"]
    assert [p.name for p in checkpoint.rotated_out(tmp_path, saved, keep=1)] == ["step_00000002", "step_00000004"]


def test_sigterm_saves_exits_zero_and_resume_continues(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(command("train", *SMALL, *STEPS, "train.max_steps=100000", f"run_dir={run_dir}",
                                    cache_dir=cache_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (run_dir / "metrics.jsonl").exists():
        time.sleep(0.2)
    time.sleep(2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text(), parse_constant=refuse)  # strict JSON
    stopped = summary["step"]
    assert not summary["completed"] and 0 < stopped < 100000
    evaluations = [row["val/loss"] for row in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
                   if "val/loss" in row]
    assert summary["val_loss"] == evaluations[-1]  # the last evaluation (at step 0: it stopped before the next)
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{stopped:08d}"
    result = dist_moe("resume", str(run_dir), f"train.max_steps={stopped + 3}", cache_dir=cache_dir)
    assert_ok(result)
    assert f"at step {stopped}" in result.stdout
    assert sorted(losses(run_dir)) == list(range(1, stopped + 4))


def test_ep2_checkpoint_resumes_on_one_process_with_the_same_next_loss(tmp_path, cache_dir):
    """Trained on 2 ranks with EP=2, resumed on 1 rank (EP=1) with the same global batch (micro batch x2):
    the weights are re-sharded, so the first resumed step's loss equals what the EP=2 run computed."""
    ep2 = [*SMALL, *STEPS, "moe.dropless=true", "moe.noise=none"]  # capacity is per rank: compare dropless
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert_ok(dist_moe("train", *ep2, "--nproc=2", "moe.ep_size=2", "train.max_steps=4", f"run_dir={straight}",
                       cache_dir=cache_dir))
    assert_ok(dist_moe("train", *ep2, "--nproc=2", "moe.ep_size=2", "train.max_steps=3", f"run_dir={split}",
                       cache_dir=cache_dir))
    result = dist_moe("resume", str(split), "moe.ep_size=1", "train.micro_batch_size=16", "train.max_steps=4",
                      cache_dir=cache_dir)
    assert_ok(result)
    assert "re-sharded" in result.stderr
    assert losses(split)[4] == pytest.approx(losses(straight)[4], rel=1e-5)
    # the data position crossed too: the same step, global batch, mixture and tokens drawn per source
    saved = [torch.load(run / "checkpoints" / "step_00000004" / "trainer_rank0.pt", weights_only=False)["sampler"]
             for run in (split, straight)]
    assert saved[0] == saved[1] and saved[0]["step"] == 4 and sum(saved[0]["tokens_seen"].values()) == 4 * 16 * 64


def test_resume_refuses_a_changed_model_key_a_missing_run_dir_and_an_older_parameter_layout(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    assert_ok(dist_moe("train", *SMALL, "train.max_steps=1", f"run_dir={run_dir}", cache_dir=cache_dir))
    result = dist_moe("resume", str(run_dir), "model.d_model=96", cache_dir=cache_dir)
    assert result.returncode == 2
    assert "'model.d_model'" in result.stderr and "cannot change on resume" in result.stderr
    assert "Traceback" not in result.stderr
    missing = dist_moe("resume", str(tmp_path / "nope"), cache_dir=cache_dir)
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    trainer_file = next((run_dir / "checkpoints").glob("step_*/trainer_rank0.pt"))
    state = torch.load(trainer_file, weights_only=False)
    del state["parameter_layout"]  # as written before the experts' w1 and w3 became one parameter
    torch.save(state, trainer_file)
    older = dist_moe("resume", str(run_dir), cache_dir=cache_dir)
    assert older.returncode == 2 and "earlier dist_moe" in older.stderr and "Traceback" not in older.stderr
    assert trainer_file.exists()


def test_train_refuses_a_run_dir_with_checkpoints_and_leaves_them_intact(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    assert_ok(dist_moe("train", *SMALL, "train.max_steps=2", f"run_dir={run_dir}", cache_dir=cache_dir))
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    again = dist_moe("train", *SMALL, "train.max_steps=2", f"run_dir={run_dir}", cache_dir=cache_dir)
    assert again.returncode == 2 and "already holds checkpoints" in again.stderr and "dist-moe resume" in again.stderr
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before
    assert sorted(losses(run_dir)) == [1, 2]


def test_an_attempt_that_died_before_its_first_checkpoint_leaves_no_duplicate_rows(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "train/loss": 9.0}\n{"step": 2, "train/loss": 8.0}\n')
    assert_ok(dist_moe("train", *SMALL, "train.max_steps=3", f"run_dir={run_dir}", "resume=auto",
                       cache_dir=cache_dir))
    assert sorted(losses(run_dir)) == [1, 2, 3] and 9.0 not in losses(run_dir).values()


def scheduled_lr(step, lr, warmup, max_steps, min_ratio):
    """The LR step `step` (counted from 1) must apply: linear warmup, cosine to lr * min_ratio at max_steps."""
    if step <= warmup:
        return lr * step / warmup
    progress = (step - warmup) / (max_steps - warmup)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def applied_lr(before, after, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1):
    """The LR AdamW applied between two checkpoints, solved from its update in float64 (least squares over every
    decayed dense weight): w' = w (1 - lr wd) - lr m_hat / (sqrt(v_hat) + eps), with the moments saved after."""
    saved = torch.load(before / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    weights = {name: value.double() for name, value in saved.items()}
    updated = torch.load(after / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    moments = torch.load(after / "portable_optim_rank0.pt", weights_only=False)["dense"]
    direction, delta = [], []
    for name, state in moments.items():
        if name not in weights or weights[name].dim() < 2:  # the router is saved under DeepSpeed's name
            continue
        t = state["step"]
        m_hat = state["exp_avg"].double() / (1 - beta1 ** t)
        v_hat = state["exp_avg_sq"].double() / (1 - beta2 ** t)
        direction.append((weights[name] * weight_decay + m_hat / (v_hat.sqrt() + eps)).flatten())
        delta.append((weights[name] - updated[name].double()).flatten())
    d, u = torch.cat(direction), torch.cat(delta)
    return float((d @ u) / (d @ d))


SCHEDULE = {"lr": 1e-2, "warmup": 2, "min_ratio": 0.1}


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory, cache_dir):
    """A 4-step run on one process with a short warmup, for both resume paths to continue."""
    run_dir = tmp_path_factory.mktemp("four") / "run"
    assert_ok(dist_moe("train", *SMALL, "train.lr=1e-2", "train.warmup_steps=2", "train.min_lr_ratio=0.1",
                       "train.weight_decay=0.1", "train.eval_every=1000", "train.max_steps=4", f"run_dir={run_dir}",
                       cache_dir=cache_dir))
    assert losses(run_dir, "train/lr")[4] == pytest.approx(1e-3, rel=1e-12)  # the last step applies the final LR
    return run_dir


@pytest.mark.parametrize("resume_on", [["--nproc=1"], ["--nproc=2", "moe.ep_size=2", "train.micro_batch_size=4"]],
                         ids=["same-topology", "re-shard"])
def test_resume_with_more_steps_applies_and_logs_the_new_schedule_from_its_first_step(tmp_path, cache_dir, four_steps,
                                                                                       resume_on):
    run_dir = tmp_path / "run"
    shutil.copytree(four_steps, run_dir)
    resumed = dist_moe("resume", str(run_dir), *resume_on, "train.max_steps=7", "ckpt.every=1", "ckpt.keep=5",
                       cache_dir=cache_dir)
    assert_ok(resumed)
    assert ("re-sharded" in resumed.stderr) == (resume_on[0] == "--nproc=2")
    logged = losses(run_dir, "train/lr")
    for step in range(1, 8):
        expected = scheduled_lr(step, **SCHEDULE, max_steps=4 if step <= 4 else 7)
        assert logged[step] == pytest.approx(expected, rel=1e-12), step
    root = run_dir / "checkpoints"
    for step in (5, 6):  # the LR the optimizer really used, from the weights it moved
        used = applied_lr(root / f"step_{step - 1:08d}", root / f"step_{step:08d}")
        assert used == pytest.approx(logged[step], rel=1e-5), step  # measured: 2e-7
    assert logged[5] > 3 * SCHEDULE["lr"] * SCHEDULE["min_ratio"]  # the old schedule (4 steps) is at its floor
