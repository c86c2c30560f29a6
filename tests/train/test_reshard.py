"""Resuming on another EP size / world size re-shards expert weights *and* their Adam state.

Reference: the run that never stopped. It checkpoints at step 3 (kept) and 4; a branch of it resumes from
step 3 on the other topology with the same global batch and takes step 4. Its weights and Adam moments
after step 4 must equal the never-stopped run's, which an update from zeroed moments does not give.
Comparable across topologies only without per-rank effects: dropless routing (capacity is per rank), no
router noise (one stream per rank) and no aux loss (Switch's f·P is not linear in the batch split).
"""

import re
import shutil

import pytest
import torch
from cli_runs import SMALL, dist_moe, losses

EXACT = [*SMALL, "train.lr=1e-2", "train.eval_every=1000", "moe.dropless=true", "moe.noise=none",
         "moe.aux_loss_coef=0", "ckpt.every=3", "ckpt.keep=2"]
RANKS = {1: ["--nproc=1", "moe.ep_size=1", "train.micro_batch_size=16"],
         2: ["--nproc=2", "moe.ep_size=2", "train.micro_batch_size=8"]}
TOLERANCE = 1e-5  # of each tensor's largest entry; measured 5e-7 (fp32, other reduction order), 0.2 from zeroed moments


def assert_ok(result):
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])


def branch_at_step_3(run_dir, to):
    """A copy of the run as if it had stopped after saving step 3."""
    shutil.copytree(run_dir, to)
    shutil.rmtree(to / "checkpoints" / "step_00000004")
    (to / "checkpoints" / "latest").write_text("step_00000003\n")
    return to


def weights(ckpt):
    """Every weight by a topology-independent name: DeepSpeed's expert files name the global expert in the file
    and the local one in the key, so the key gets the global id."""
    out = dict(torch.load(ckpt / "mp_rank_00_model_states.pt", weights_only=False)["module"])
    for file in ckpt.glob("layer_*_expert_*_mp_rank_00_model_states.pt"):
        expert = re.match(r"layer_\d+_expert_(\d+)_", file.name).group(1)
        for key, value in torch.load(file, weights_only=True).items():
            out[re.sub(r"deepspeed_experts\.\d+\.", f"deepspeed_experts.{expert}.", key)] = value
    return out


def adam_state(ckpt):
    """(parameter, global expert or None, key) -> value, merged over the portable files of all ranks."""
    out = {}
    for file in ckpt.glob("portable_optim_rank*.pt"):
        saved = torch.load(file, weights_only=True)
        for name, entry in saved["dense"].items():
            out |= {(name, None, k): v for k, v in entry.items()}
        for name, per_expert in saved["experts"].items():
            out |= {(name, e, k): v for e, entry in per_expert.items() for k, v in entry.items()}
    return out


def worst_error(got, want):
    """The largest |got - want| / max |want| over all tensors, and where it is."""
    assert got.keys() == want.keys()
    tiny = torch.finfo(torch.float32).tiny
    errors = ((float((torch.as_tensor(got[k]) - want[k]).abs().max() / want[k].abs().max().clamp_min(tiny)), k)
              for k in want if torch.is_tensor(want[k]))
    return max(errors, key=lambda e: e[0])


def assert_same_state(got, want):
    steps = {k: v for k, v in want["adam"].items() if k[2] == "step"}
    assert set(steps.values()) == {4} and {k: got["adam"][k] for k in steps} == steps  # bias correction continues
    assert got["sampler"] == want["sampler"] and got["sampler"]["step"] == 4  # position, mixture, tokens per source
    for kind in ("weights", "adam"):
        error, key = worst_error(got[kind], want[kind])
        assert error <= TOLERANCE, f"{kind} {key}: relative error {error:.2e}"


def state_at_step_4(run_dir):
    """Weights, Adam state and the data sampler's position (the same on every rank: it is global)."""
    ckpt = run_dir / "checkpoints" / "step_00000004"
    samplers = [torch.load(file, weights_only=False)["sampler"] for file in sorted(ckpt.glob("trainer_rank*.pt"))]
    assert all(sampler == samplers[0] for sampler in samplers)
    return {"weights": weights(ckpt), "adam": adam_state(ckpt), "sampler": samplers[0]}


def resume(run_dir, nproc, cache_dir, max_steps=4):
    result = dist_moe("resume", str(run_dir), f"train.max_steps={max_steps}", *RANKS[nproc], cache_dir=cache_dir)
    assert_ok(result)
    assert "at step 3" in result.stdout
    return result


def test_ep2_on_two_processes_resumes_on_one_with_the_never_stopped_weights_and_adam_state(tmp_path, cache_dir):
    # ZeRO-0: the unpartitioned AdamW. It clips with the mean of the ranks' local norms (not the global norm
    # like ZeRO-1/2 and one process), so compare without clipping.
    straight = tmp_path / "straight"
    assert_ok(dist_moe("train", *EXACT, "train.zero_stage=0", "train.grad_clip=0", *RANKS[2], "train.max_steps=4",
                       f"run_dir={straight}", cache_dir=cache_dir))
    resumed = resume(branch_at_step_3(straight, tmp_path / "resumed"), 1, cache_dir)
    assert "Adam state re-sharded" in resumed.stderr
    want = state_at_step_4(straight)
    assert {e for _, e, _ in want["adam"]} == {None, 0, 1, 2, 3}  # 4 experts, written by 2 ranks
    assert_same_state(state_at_step_4(tmp_path / "resumed"), want)
    assert losses(tmp_path / "resumed")[4] == pytest.approx(losses(straight)[4], rel=1e-5)

    # The same resume from zeroed moments (what resuming did before) misses the reference by far more.
    zeroed = branch_at_step_3(straight, tmp_path / "zeroed")
    for file in (zeroed / "checkpoints" / "step_00000003").glob("portable_optim_rank*.pt"):
        saved = torch.load(file, weights_only=True)
        for entry in [*saved["dense"].values(), *(e for per in saved["experts"].values() for e in per.values())]:
            entry["exp_avg"].zero_(), entry["exp_avg_sq"].zero_()
        torch.save(saved, file)
    resume(zeroed, 1, cache_dir)
    assert worst_error(state_at_step_4(zeroed)["weights"], want["weights"])[0] > 1000 * TOLERANCE


def test_one_process_resumes_as_ep2_on_two_with_the_never_stopped_weights_and_adam_state(tmp_path, cache_dir):
    # ZeRO-2: Adam state in flat partitions, which split every parameter group over the 2 resumed ranks.
    straight = tmp_path / "straight"
    assert_ok(dist_moe("train", *EXACT, "train.zero_stage=2", *RANKS[1], "train.max_steps=4", f"run_dir={straight}",
                       cache_dir=cache_dir))
    resumed = branch_at_step_3(straight, tmp_path / "resumed")
    result = resume(resumed, 2, cache_dir)
    assert "Adam state re-sharded" in result.stderr
    assert_same_state(state_at_step_4(resumed), state_at_step_4(straight))
    assert losses(resumed)[4] == pytest.approx(losses(straight)[4], rel=1e-5)


@pytest.mark.parametrize("zero", [0, 1, 2])
def test_bf16_adam_state_and_fp32_master_weights_cross_a_topology_change_bit_for_bit(tmp_path, cache_dir, zero):
    """Under bf16 the module holds only the bf16 copy: the fp32 master weights must come from the portable
    file too. A resume on 1 process that takes no step saves again exactly what 2 processes wrote."""
    saved = tmp_path / "saved"
    assert_ok(dist_moe("train", *EXACT, "train.precision=bf16", f"train.zero_stage={zero}", *RANKS[2],
                       "train.max_steps=3", f"run_dir={saved}", cache_dir=cache_dir))
    shutil.copytree(saved, tmp_path / "resumed")
    resume(tmp_path / "resumed", 1, cache_dir, max_steps=3)
    want, got = (adam_state(run / "checkpoints" / "step_00000003") for run in (saved, tmp_path / "resumed"))
    assert {k[2] for k in want} == {"exp_avg", "exp_avg_sq", "step", "fp32"} and got.keys() == want.keys()
    for key in want:
        assert torch.equal(torch.as_tensor(got[key]), torch.as_tensor(want[key])), key
