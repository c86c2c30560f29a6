"""The Ray Jobs client: address rules, the job's entrypoint and preset staging, bounded failures, and a real
local Ray job server on 127.0.0.1 whose `dist-moe` is a small script (the trainer is tested elsewhere)."""

from __future__ import annotations

import http.server
import os
import shlex
import socket
import tempfile
import threading
import time
from pathlib import Path

import pytest

from dist_moe.cluster import jobs
from dist_moe.config import ConfigError
from ray_cluster import ray_head_node


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def no_ray_env(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)


def test_address_explicit_then_env_then_default(no_ray_env, monkeypatch):
    assert jobs.resolve_address(None) == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:8265")
    assert jobs.resolve_address(None) == "http://10.0.0.5:8265"
    assert jobs.resolve_address("https://head.example:443/") == "https://head.example:443"
    with pytest.raises(jobs.JobError, match="address 'ray://head:10001': expected the Ray job server's HTTP"):
        jobs.resolve_address("ray://head:10001")


def test_entrypoint_quotes_overrides_and_ends_with_cluster_ray():
    command = jobs.entrypoint("presets/my run.yaml", ["run_dir=/shared/a b", "train.lr=1e-3", "cluster=local"])
    assert shlex.split(command) == ["dist-moe", "train", "presets/my run.yaml", "run_dir=/shared/a b",
                                    "train.lr=1e-3", "cluster=local", "cluster=ray"]
    assert shlex.split(jobs.entrypoint(None, [])) == ["dist-moe", "train", "cluster=ray"]


def test_runtime_env_uploads_the_working_dir_without_runs_venv_git(tmp_path):
    env = jobs.runtime_env(tmp_path, stop_timeout_s=300)
    assert env["working_dir"] == str(tmp_path)
    assert {"runs/", ".venv/", ".git/"} <= set(env["excludes"])
    assert env["env_vars"]["RAY_TRAIN_ENABLE_PRINT_PATCH"] == "0"  # worker prints are not doubled
    assert env["env_vars"]["RAY_JOB_STOP_WAIT_TIME_S"] == "330"  # Ray's job stop outlasts the driver's wait


def test_shipped_preset_is_passed_by_name_and_nothing_is_staged(tmp_path):
    with jobs.staged_preset("small", tmp_path) as ref:
        assert ref == "small"
        assert list(tmp_path.iterdir()) == []


def test_local_preset_outside_working_dir_is_staged_inside_and_removed(tmp_path):
    working_dir, elsewhere = tmp_path / "wd", tmp_path / "elsewhere"
    working_dir.mkdir(), elsewhere.mkdir()
    preset = elsewhere / "exp.yaml"
    preset.write_text("train:\n  max_steps: 7\n")
    with jobs.staged_preset(str(preset), working_dir) as ref:
        staged = working_dir / ref
        assert not Path(ref).is_absolute() and staged.name == "exp.yaml"
        assert staged.read_text() == preset.read_text()
    assert list(working_dir.iterdir()) == []


def test_bad_override_is_a_config_error_before_any_network(no_ray_env, tmp_path):
    address = f"http://127.0.0.1:{closed_port()}"
    with pytest.raises(ConfigError, match="train.max_step"):
        jobs.submit(address, "tiny", ["train.max_step=5"], working_dir=str(tmp_path))


@pytest.mark.parametrize("call", [
    lambda a, d: jobs.submit(a, "tiny", ["run_dir=/tmp/x"], working_dir=d),
    lambda a, d: jobs.status(a, "raysubmit_x"),
    lambda a, d: jobs.logs(a, "raysubmit_x", follow=True),
    lambda a, d: jobs.stop(a, "raysubmit_x"),
])
def test_unreachable_address_fails_fast_with_one_line(no_ray_env, tmp_path, call):
    address = f"http://127.0.0.1:{closed_port()}"
    start = time.monotonic()
    with pytest.raises(jobs.JobError) as info:
        call(address, str(tmp_path))
    assert time.monotonic() - start < 5
    assert str(info.value).startswith(f"cannot reach the Ray job server at {address} ")
    assert "\n" not in str(info.value)


@pytest.fixture
def plain_http_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_an_http_server_that_is_not_ray_is_named(no_ray_env, plain_http_server):
    with pytest.raises(jobs.JobError, match=r"is not a Ray job server \(GET /api/version answered 404\)"):
        jobs.status(plain_http_server, "raysubmit_x")


# ---------------------------------------------------------------------------------------------------------
# A real Ray head on 127.0.0.1. Its PATH starts with a folder holding a fake `dist-moe`, so submitted jobs
# run the real Ray Jobs machinery (upload, runtime env, driver, log tail) around a command we control.

FAKE_DIST_MOE = """#!/usr/bin/env bash
echo "argv:$(printf ' %q' "$@")"
echo "files: $(find . -path ./.dist_moe_submit -prune -o -type f -print | sort | tr '\\n' ' ')"
for arg in "$@"; do [[ $arg == *.yaml ]] && echo "preset: $(tr '\\n' ' ' < "$arg")"; done
[[ " $* " == *" train.max_steps=13 "* ]] && { echo "failing on purpose" >&2; exit 3; }
[[ " $* " == *" train.max_steps=77 "* ]] && sleep 60
exit 0
"""


@pytest.fixture(scope="module")
def ray_head():
    """A real Ray head on 127.0.0.1 whose PATH holds the fake dist-moe above (see ray_cluster.py)."""
    with tempfile.TemporaryDirectory(prefix="dmbin", dir="/tmp") as bin_dir:
        fake = Path(bin_dir) / "dist-moe"
        fake.write_text(FAKE_DIST_MOE)
        fake.chmod(0o755)
        with ray_head_node(num_cpus=1, path_prefix=bin_dir) as url:
            yield url


@pytest.fixture
def working_dir(tmp_path) -> Path:
    wd = tmp_path / "project"
    for name in ("train.txt", "runs/old/ckpt.bin", ".git/HEAD", ".venv/bin/python"):
        (wd / name).parent.mkdir(parents=True, exist_ok=True)
        (wd / name).write_text(name)
    return wd


@pytest.mark.slow
def test_submit_follows_a_real_job_with_the_staged_preset_and_working_dir(no_ray_env, ray_head, working_dir,
                                                                         tmp_path, capsys):
    preset = tmp_path / "exp.yaml"
    preset.write_text("train:\n  max_steps: 5\n")
    job_id = jobs.submit(ray_head, str(preset), ["run_dir=/shared/runs/a b"], working_dir=str(working_dir))
    out = capsys.readouterr().out
    assert f"submitted job {job_id} to {ray_head}" in out
    argv_line = next(line for line in out.splitlines() if line.startswith("argv: "))
    argv = shlex.split(argv_line[len("argv: "):])
    assert argv[0] == "train" and argv[1].startswith(".dist_moe_submit/") and argv[1].endswith("/exp.yaml")
    assert argv[2:] == ["run_dir=/shared/runs/a b", "cluster=ray"]
    assert "preset: train:   max_steps: 5" in out
    files_line = next(line for line in out.splitlines() if line.startswith("files: "))
    assert files_line.split()[1:] == ["./train.txt"]  # runs/, .git/, .venv/ stayed home
    assert not (working_dir / ".dist_moe_submit").exists()
    assert jobs.status(ray_head, job_id) == "SUCCEEDED"
    jobs.logs(ray_head, job_id)
    assert argv_line in capsys.readouterr().out


@pytest.mark.slow
def test_failed_job_raises_with_its_status(no_ray_env, ray_head, working_dir, capsys):
    with pytest.raises(jobs.JobError, match=r"job raysubmit_\w+ ended FAILED: "):
        jobs.submit(ray_head, "tiny", ["train.max_steps=13", "run_dir=/tmp/x"], working_dir=str(working_dir))
    assert "failing on purpose" in capsys.readouterr().out


@pytest.mark.slow
def test_no_wait_returns_while_running_and_stop_stops_it(no_ray_env, ray_head, working_dir):
    start = time.monotonic()
    job_id = jobs.submit(ray_head, None, ["train.max_steps=77", "run_dir=/tmp/x"], no_wait=True,
                         working_dir=str(working_dir))
    assert time.monotonic() - start < 30
    assert jobs.stop(ray_head, job_id) is True
    deadline = time.monotonic() + 30
    while jobs.status(ray_head, job_id) != "STOPPED":
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert jobs.stop(ray_head, job_id) is False


@pytest.mark.slow
@pytest.mark.parametrize("call", [jobs.status, jobs.logs, jobs.stop])
def test_unknown_job_id_is_named(no_ray_env, ray_head, call):
    with pytest.raises(jobs.JobError, match=f"job 'raysubmit_nope' not found on {ray_head}"):
        call(ray_head, "raysubmit_nope")


@pytest.mark.slow
def test_explicit_address_wins_over_ray_address_env(monkeypatch, ray_head, plain_http_server):
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_ADDRESS", plain_http_server)  # Ray's own client would let this win
    with pytest.raises(jobs.JobError, match=f"job 'raysubmit_nope' not found on {ray_head}"):
        jobs.status(ray_head, "raysubmit_nope")
    assert os.environ["RAY_ADDRESS"] == plain_http_server
