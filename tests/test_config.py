import shlex
import subprocess
from pathlib import Path
import sys

import pytest

from dist_moe import config
from dist_moe.config import ConfigError, from_yaml, load_config, to_yaml
from dist_moe.train.engine import deepspeed_config


def test_defaults_then_preset_then_overrides():
    cfg = load_config("tiny", ["moe.top_k=1", "train.lr=0.01", "cluster=ray"])
    assert cfg.model.d_model == 192  # from configs/tiny.yaml
    assert cfg.model.rope_theta == 10000.0  # dataclass default
    assert (cfg.moe.top_k, cfg.train.lr, cfg.cluster.kind) == (1, 0.01, "ray")


def test_preset_from_a_yaml_path(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("model:\n  num_layers: 3\n")
    assert load_config(str(path)).model.num_layers == 3


@pytest.mark.parametrize("overrides, key, expected", [
    (["moe.foo=1"], "moe.foo", "unknown config key"),
    (["nope=1"], "nope", "unknown config key"),
    (["moe.top_k=two"], "moe.top_k", "expected int"),
    (["moe.top_k=9"], "moe.top_k", "<= moe.num_experts=8"),
    (["model.num_kv_heads=3"], "model.num_kv_heads", "divisor of model.num_heads"),
    (["moe.ep_size=3"], "moe.ep_size", "divisor of moe.num_experts"),
    (["train.zero_stage=3"], "train.zero_stage", "0, 1 or 2"),
    (["model.rope_scaling=dynamic"], "model.rope_scaling", "none | linear | ntk | yarn"),
    (["data.seq_len=4096"], "data.seq_len", "<= model.max_seq_len"),
    (["moe.impl=deepspeed", "moe.top_k=4"], "moe.top_k", "1 or 2 with moe.impl=deepspeed"),
    (["moe.impl=deepspeed", "moe.exchange=padded"], "moe.exchange", "'ragged' with moe.impl=deepspeed"),
    (["moe.impl=deepspeed", "moe.ep_size=2", "moe.a2a_chunks=2"], "moe.a2a_chunks", "1 with moe.impl=deepspeed"),
    (["cluster.hang_timeout_s=0"], "cluster.hang_timeout_s", "a positive number of seconds"),
    (["moe.ep_size=2", "moe.a2a_chunks=5"], "moe.a2a_chunks", "1 .. experts per rank (4)"),
    (["moe.exchange=even"], "moe.exchange", "ragged | padded | bounded"),
    (["moe.exchange=bounded"], "moe.exchange", "ragged or padded unless moe.dropless=true"),
    (["moe.exchange=bounded", "moe.dropless=true", "moe.bound_factor=0"], "moe.bound_factor", "> 0"),
    (["objective=dpo", "data.prefs=p.jsonl", "moe.ep_size=2", "moe.exchange=padded"], "moe.exchange",
     "ragged with objective=dpo"),
])
def test_bad_config_is_one_line_naming_the_key(overrides, key, expected):
    with pytest.raises(ConfigError) as info:
        load_config("tiny", overrides)
    message = str(info.value)
    assert f"'{key}'" in message and expected in message and "\n" not in message


def test_unknown_preset_and_malformed_override():
    with pytest.raises(ConfigError, match="preset 'huge'"):
        load_config("huge")
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config("tiny", ["train.lr"])


def test_world_size_must_be_a_multiple_of_ep_size():
    cfg = load_config("tiny", ["moe.ep_size=4"])
    config.check_world_size(cfg, 8)
    with pytest.raises(ConfigError, match="'moe.ep_size'.*world size 2"):
        config.check_world_size(cfg, 2)


def test_ep_size_beyond_the_ranks_is_refused_before_a_run_dir_exists_with_the_flag_that_adds_ranks(tmp_path):
    result = _cli("train", "moe.ep_size=2", f"run_dir={tmp_path / 'run'}")
    assert result.returncode == 2 and not (tmp_path / "run").exists()
    assert result.stderr.strip().splitlines() == [
        "error: config key 'moe.ep_size' = 2: expected a divisor of the world size 1 (run on 2 ranks or a "
        "multiple: dist-moe train --nproc 2)"]
    cfg = load_config("tiny", ["moe.ep_size=4", "cluster=ray", "cluster.num_workers=2"])
    with pytest.raises(ConfigError, match=r"cluster.num_workers=4\)$"):
        config.check_world_size(cfg, 2)


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_config("tiny", ["moe.capacity_factor=1.5"])
    path = tmp_path / "config.yaml"
    path.write_text(config.to_yaml(cfg))
    assert config.from_yaml_file(path) == cfg


def test_deepspeed_config_follows_the_training_config():
    cfg = load_config("tiny", ["train.zero_stage=2", "train.grad_accum_steps=4", "train.grad_clip=0.5"])
    ds = deepspeed_config(cfg, world_size=2, device_type="cpu")
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["train_batch_size"] == cfg.train.micro_batch_size * 4 * 2
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is False
    assert deepspeed_config(cfg, 1, "cuda")["bf16"]["enabled"] is True
    fp32 = load_config("tiny", ["train.precision=fp32"])
    assert deepspeed_config(fp32, 1, "cuda")["bf16"]["enabled"] is False


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "dist_moe.cli", *args], capture_output=True, text=True)


def test_cli_config_error_exits_2_with_one_line_and_no_traceback():
    result = _cli("train", "moe.top_k=9")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: config key 'moe.top_k' = 9: expected <= moe.num_experts=8"


def test_cli_train_help_lists_every_config_key_with_its_meaning():
    result = _cli("train", "--help")
    assert result.returncode == 0
    for key in ("model.num_kv_heads", "moe.capacity_factor", "moe.ep_size", "data.corpus", "train.zero_stage",
                "ckpt.every", "log.expert_every", "cluster.kind"):
        assert key in result.stdout
    assert "key/value heads (GQA)" in result.stdout


def test_cli_train_help_shows_the_default_presets_values_and_names_it():
    """The values a bare `dist-moe train` runs with: the tiny preset's, read here from its YAML file."""
    import yaml

    tiny = yaml.safe_load((config._preset_dir() / "tiny.yaml").read_text())
    assert config.DEFAULT_PRESET == "tiny" and tiny["model"]["d_model"] != config.ModelConfig().d_model
    result = _cli("train", "--help")
    rows = {line.split()[0]: line.split()[1] for line in result.stdout.splitlines() if line.startswith("    ")}
    for section in ("model", "moe", "train"):
        for key, value in tiny[section].items():
            assert rows[f"{section}.{key}"] == (repr(value) if isinstance(value, str) else str(value)), key
    assert rows["model.rope_theta"] == "10000.0"  # a key tiny leaves at the built-in default
    assert "tiny when left out" in " ".join(result.stdout.split())


def test_cli_resume_of_a_missing_run_dir_is_a_clear_error(tmp_path):
    result = _cli("resume", str(tmp_path / "nope"))
    assert result.returncode == 2 and "does not exist" in result.stderr and "Traceback" not in result.stderr


def test_renamed_rope_key_points_to_transformers_name():
    with pytest.raises(ConfigError, match=r"'model.yarn_beta_fast' is now 'model.rope_beta_fast'"):
        load_config("tiny", ["model.yarn_beta_fast=16"])


def test_old_run_config_is_read_with_new_names_and_old_yarn_is_refused(tmp_path):
    old = to_yaml(load_config("tiny")).replace("rope_original_max_position_embeddings:", "rope_original_max_seq_len:")
    old = old.replace("rope_beta_fast: 32.0", "yarn_beta_fast: 16.0")
    path = tmp_path / "config.yaml"
    path.write_text(old)
    assert load_config(str(path)).model.rope_beta_fast == 16.0
    assert from_yaml(old).model.rope_beta_fast == 16.0
    path.write_text(old.replace("rope_scaling: none", "rope_scaling: yarn"))
    with pytest.raises(ConfigError, match="earlier YaRN") as info:
        load_config(str(path))
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="earlier YaRN"):
        from_yaml(path.read_text())


def test_elastic_worker_counts_keep_the_global_batch_and_ep_follows():
    cfg = load_config("tiny", ["cluster.num_workers=4", "moe.ep_size=4", "train.micro_batch_size=6",
                               "cluster.min_workers=2"])
    for workers, micro_batch, ep_size in [(4, 6, 4), (3, 8, 1), (2, 12, 2)]:
        fitted = config.fit_to_workers(cfg, workers)
        assert (fitted.train.micro_batch_size, fitted.moe.ep_size) == (micro_batch, ep_size)
        config.check_world_size(fitted, workers)
        assert fitted.cluster == cfg.cluster and fitted.model == cfg.model  # only the layout changes
    assert cfg.train.micro_batch_size == 6 and cfg.moe.ep_size == 4  # the original is left as it was


def test_elastic_range_with_a_count_that_cannot_keep_the_global_batch_is_refused():
    # 4 workers x 8 = 32 sequences: 3 workers cannot share them evenly, so min_workers=3 or lower is refused
    with pytest.raises(ConfigError, match="'cluster.min_workers' = 3: expected a worker count from which every "
                                          "count up to cluster.num_workers divides the global micro batch .* 32"):
        load_config("tiny", ["cluster.num_workers=4", "train.micro_batch_size=8", "cluster.min_workers=3"])
    assert load_config("tiny", ["cluster.num_workers=4", "train.micro_batch_size=8",
                                "cluster.min_workers=4"]).cluster.min_workers == 4
    with pytest.raises(ConfigError, match="'cluster.min_workers' = 5: expected 0 .off. to cluster.num_workers=4"):
        load_config("tiny", ["cluster.num_workers=4", "cluster.min_workers=5"])


def test_every_train_line_of_the_readme_tour_is_a_valid_config():
    """The README's `dist-moe train ...` examples load and validate as written (docs that match the code)."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    lines = [shlex.split(line, comments=True)[2:] for line in readme.splitlines() if line.startswith("dist-moe train ")]
    assert len(lines) >= 5, lines
    for args in lines:
        args = [a for a in args if a != "--help"]
        nproc = int(args[args.index("--nproc") + 1]) if "--nproc" in args else 1
        args = [a for i, a in enumerate(args) if a != "--nproc" and (i == 0 or args[i - 1] != "--nproc")]
        preset = args.pop(0) if args and "=" not in args[0] else None
        cfg = load_config(preset, args)
        config.check_world_size(cfg, nproc if cfg.cluster.kind != "ray" else cfg.cluster.num_workers)


def test_every_key_with_choices_refuses_other_values_and_help_lists_them():
    keys = config._choice_keys()
    assert len(keys) >= 19 and ("moe.score", ("softmax", "sigmoid")) in keys
    help_lines = config.help_text(config.DEFAULT_PRESET).splitlines()
    for key, allowed in keys:
        with pytest.raises(ConfigError, match=f"'{key}' = 'bogus': expected one of " + r" \| ".join(allowed)):
            load_config(None, [f"{key}=bogus"])
        line = next(line for line in help_lines if line.split() and line.split()[0] == key)
        assert all(value in line for value in allowed), line
