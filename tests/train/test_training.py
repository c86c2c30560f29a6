"""Short real runs through the CLI, DeepSpeed and the stdlib corpus (each in its own process, as users run)."""

import json
import re
import subprocess
import sys

import pytest

from cli_runs import SMALL, dist_moe, read_metrics


def test_short_run_loss_falls_and_leaves_a_complete_run_dir(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    result = dist_moe("train", *SMALL, "train.max_steps=40", "train.eval_every=20", "train.lr=1e-2",
                      f"run_dir={run_dir}", cache_dir=cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_metrics(run_dir)
    train = [r["train/loss"] for r in rows if "train/loss" in r]
    val = [r["val/loss"] for r in rows if "val/loss" in r]
    assert train[-1] < train[0] - 0.8, train
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == 40 and summary["completed"]
    # 40 steps reach about the unigram baseline (~5.05 nats here) on a val split of several documents
    assert val[-1] < val[0] - 0.8 and val[-1] < summary["unigram_entropy"] + 0.2, (val, summary["unigram_entropy"])
    for name in ("config.yaml", "tokenizer.model", "checkpoints/latest", "tb"):
        assert (run_dir / name).exists(), name
    assert (run_dir / "checkpoints" / (run_dir / "checkpoints/latest").read_text().strip()).is_dir()
    assert "run dir:" in result.stdout and "dist-moe tensorboard" in result.stdout
    status = subprocess.run([sys.executable, "-m", "dist_moe.cli", "status", str(run_dir)], capture_output=True,
                            text=True).stdout.splitlines()
    assert status[0] == f"run {run_dir}: last logged step 40 of 40; newest checkpoint step_00000040 (1 complete)"
    assert status[1].startswith("summary.json: step 40, completed") and status[3].split()[:1] == ["0"]
    assert status[3].endswith("exited") and "finished" in status[3]  # rank 0 left the loop after finishing


def test_missing_corpus_is_one_clear_line_and_leaves_no_empty_run_dir(tmp_path, cache_dir):
    result = dist_moe("train", f"data.corpus={tmp_path}/nope.txt", f"run_dir={tmp_path}/run", cache_dir=cache_dir)
    assert result.returncode == 2
    assert "nope.txt" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "run").exists()  # this run created it and it held nothing
    (tmp_path / "mine").mkdir()  # a dir the user made: kept, however empty
    again = dist_moe("train", f"data.corpus={tmp_path}/nope.txt", f"run_dir={tmp_path}/mine", cache_dir=cache_dir)
    assert again.returncode == 2 and (tmp_path / "mine").is_dir()


@pytest.mark.parametrize("impl", ["dist_moe", "deepspeed"])
def test_two_process_ep2_zero2_run_learns_with_either_moe_impl(tmp_path, cache_dir, impl):
    run_dir = tmp_path / "run"
    result = dist_moe("train", "--nproc", "2", *SMALL, "moe.ep_size=2", "train.zero_stage=2", f"moe.impl={impl}",
                      "train.max_steps=30", "train.eval_every=30", "train.lr=1e-2", f"run_dir={run_dir}",
                      cache_dir=cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 rank(s)" in result.stdout and "EP=2, ZeRO-2" in result.stdout
    train = [r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r]
    assert train[-1] < train[0] - 0.8, train
    assert sorted((run_dir / "checkpoints" / "step_00000030").glob("layer_*_expert_*_model_states.pt"))


def test_generate_samples_from_an_ep2_checkpoint_in_one_process(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    result = dist_moe("train", "--nproc", "2", *SMALL, "moe.ep_size=2", "train.max_steps=2", f"run_dir={run_dir}",
                      cache_dir=cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]

    def sample(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "dist_moe.cli", "generate", str(run_dir), "--prompt",
                               "def main():", "--max-new-tokens", "12", *args], capture_output=True, text=True,
                              timeout=300)

    greedy, again, hot = sample("--temperature", "0"), sample("--temperature", "0"), sample("--seed", "1")
    assert greedy.returncode == 0, greedy.stderr[-3000:]
    text = greedy.stdout  # the sample and nothing else (DeepSpeed's own prints stay off stdout)
    assert text.startswith("def main():") and len(text.strip()) > len("def main():"), text
    assert again.stdout == text and hot.returncode == 0 and hot.stdout.startswith("def main():")
    missing = subprocess.run([sys.executable, "-m", "dist_moe.cli", "generate", str(tmp_path / "nope")],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "no config.yaml" in missing.stderr


def test_bounded_exchange_run_trains_as_ragged_and_counts_its_redone_forwards(tmp_path, cache_dir):
    """Dropless EP=2 through the CLI with bounds that start far too small (bound_factor 0.3): every overflow is
    redone before any backward, so the losses equal the ragged exchange's bit for bit; a layer's first overflow
    prints one line, later ones only count in moe/bound_overflows."""
    runs = {}
    for exchange in ("ragged", "bounded"):
        run_dir = tmp_path / exchange
        result = dist_moe("train", "--nproc", "2", *SMALL, "moe.ep_size=2", "moe.dropless=true",
                          f"moe.exchange={exchange}", "moe.bound_factor=0.3", "train.max_steps=6",
                          "train.eval_every=3", f"run_dir={run_dir}", cache_dir=cache_dir)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[exchange] = (read_metrics(run_dir), result.stdout + result.stderr)
    (ragged, _), (bounded, output) = runs["ragged"], runs["bounded"]
    loss = lambda rows, key: [row[key] for row in rows if key in row]  # noqa: E731
    assert loss(bounded, "train/loss") == loss(ragged, "train/loss") and len(loss(ragged, "train/loss")) == 6
    assert loss(bounded, "val/loss") == loss(ragged, "val/loss")
    redos = loss(bounded, "moe/bound_overflows")
    assert len(redos) == 6 and sum(redos) >= 1 and not loss(ragged, "moe/bound_overflows")
    first = [line for line in output.splitlines() if "overflowed for the first time" in line]
    layers = re.findall(r"'(blocks\.\d+\.ffn)'", "".join(first))
    assert first and len(layers) == len(set(layers)), first  # each layer's first overflow once, then silence
