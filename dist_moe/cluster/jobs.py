"""Ray Jobs client: `dist-moe submit | status | logs | stop` against a standing Ray cluster's job server.

A submitted job runs `dist-moe train [PRESET] key=value ... cluster=ray` as the driver on the head node,
with the local working dir uploaded beside it (runtime_env working_dir). Every call first probes the job
server with a bounded timeout, so a wrong address fails in seconds with one line instead of hanging.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Iterator, Optional

from dist_moe import config
from dist_moe.cluster.trainer import WORKER_ENV
from dist_moe.errors import UserError

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
EXCLUDES = ["runs/", ".venv/", ".git/", "__pycache__/"]  # never uploaded with the working dir
STAGING = ".dist_moe_submit"  # a local preset file is copied here (inside the working dir) while uploading
PROBE_TIMEOUT_S = (3.0, 10.0)  # (connect, read) for the reachability probe
STOP_MARGIN_S = 30  # Ray's job stop timeout = cluster.stop_timeout_s + this (the driver's exit, Ray's shutdown)


class JobError(UserError, RuntimeError):
    """A job-server problem the user can act on (address, job id, failed job); one line."""


def resolve_address(address: Optional[str]) -> str:
    """--address, else $RAY_ADDRESS, else the local default; always the job server's http(s) URL."""
    address = (address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS).rstrip("/")
    if "://" not in address:
        return f"http://{address}"
    if not address.startswith(("http://", "https://")):
        raise JobError(f"address '{address}': expected the Ray job server's HTTP address, e.g. {DEFAULT_ADDRESS}")
    return address


def _probe(url: str) -> None:
    import requests

    try:
        reply = requests.get(f"{url}/api/version", timeout=PROBE_TIMEOUT_S)
    except requests.exceptions.RequestException as exc:
        reason = type(exc).__name__
        raise JobError(f"cannot reach the Ray job server at {url} ({reason}); start a cluster with "
                       f"`ray start --head` or pass --address http://HEAD:8265") from None
    if reply.status_code == 401 and "authentication token" in reply.text:
        _use_token_auth(url)
        return
    try:
        ok = reply.status_code == 200 and "ray_version" in reply.json()
    except ValueError:
        ok = False
    if not ok:
        raise JobError(f"{url} is not a Ray job server (GET /api/version answered {reply.status_code}); "
                       f"expected the dashboard address, e.g. http://HEAD:8265")


def _use_token_auth(url: str) -> None:
    """The server wants Ray's token auth (its default once ~/.ray/auth_token exists); Ray's client sends the
    token only with RAY_AUTH_MODE=token, so turn that on when a token is at hand, else say what is missing."""
    token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    if not (os.environ.get("RAY_AUTH_TOKEN") or token_file.is_file()):
        raise JobError(f"the Ray job server at {url} requires a token: set RAY_AUTH_TOKEN or copy the cluster's "
                       f"~/.ray/auth_token to {token_file}")
    os.environ.setdefault("RAY_AUTH_MODE", "token")


@contextlib.contextmanager
def _without_env(*names: str) -> Iterator[None]:
    """Ray's client lets RAY_ADDRESS / RAY_API_SERVER_ADDRESS override an explicit address; ours must win."""
    saved = {name: os.environ.pop(name) for name in names if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


@contextlib.contextmanager
def _quiet_ray_client() -> Iterator[None]:
    """While Ray's job client packs and uploads the working dir: its INFO line per step off, and its notice that
    .git and .venv are now left out by default (we leave them out anyway, EXCLUDES) dropped; other warnings stay.
    submit says in one line what it uploads."""
    quieted = [logging.getLogger("ray"), logging.getLogger("ray.dashboard.modules.dashboard_sdk")]  # the 2nd: own level
    levels = [logger.level for logger in quieted]
    for logger in quieted:
        logger.setLevel(logging.WARNING)
    packing = logging.getLogger("ray._private.runtime_env.working_dir")

    def not_the_default_excludes_notice(record: logging.LogRecord) -> bool:
        return "is now ignored by default" not in str(record.msg)

    packing.addFilter(not_the_default_excludes_notice)
    try:
        yield
    finally:
        for logger, level in zip(quieted, levels):
            logger.setLevel(level)
        packing.removeFilter(not_the_default_excludes_notice)


def _client(address: Optional[str]):
    """A JobSubmissionClient for a reachable job server, or JobError."""
    url = resolve_address(address)
    _probe(url)  # before importing ray: Ray reads RAY_AUTH_MODE once, at import
    from ray.job_submission import JobSubmissionClient

    with _without_env("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        return JobSubmissionClient(url)


def _job_info(jobs, job_id: str):
    try:
        return jobs.get_job_info(job_id)
    except RuntimeError as exc:
        if "404" in str(exc):
            raise JobError(f"job '{job_id}' not found on {jobs.get_address()} (see `ray job list`)") from None
        raise JobError(f"job '{job_id}': {str(exc).splitlines()[0]}") from None


def entrypoint(preset_ref: Optional[str], overrides: list[str]) -> str:
    """The shell command the job runs; `cluster=ray` comes last so the job always uses Ray Train."""
    return shlex.join(["dist-moe", "train", *([preset_ref] if preset_ref else []), *overrides, "cluster=ray"])


def runtime_env(working_dir: Path, stop_timeout_s: int) -> dict:
    """What travels with the job. Ray's job supervisor reads its stop timeout (SIGTERM to the driver, SIGKILL
    this many seconds later; Ray's default is 3 s) from the job's env vars: it must outlast the driver's own
    wait for the workers' save, cluster.stop_timeout_s, plus Ray's shutdown."""
    env_vars = {**WORKER_ENV, "RAY_JOB_STOP_WAIT_TIME_S": str(stop_timeout_s + STOP_MARGIN_S)}
    return {"working_dir": str(working_dir), "excludes": list(EXCLUDES), "env_vars": env_vars}


def is_local_preset(preset: Optional[str]) -> bool:
    """Same rule as config.resolve_preset: an existing .yaml/.yml path is a file, anything else a name."""
    return bool(preset) and Path(preset).suffix in (".yaml", ".yml") and Path(preset).is_file()


@contextlib.contextmanager
def staged_preset(preset: Optional[str], working_dir: Path) -> Iterator[Optional[str]]:
    """Yield the preset as the job will name it: a shipped name as is, a local file as a copy staged inside
    the working dir (relative path, so it travels even if it lives elsewhere or is git-ignored)."""
    if not is_local_preset(preset):
        yield preset
        return
    folder = working_dir / STAGING / uuid.uuid4().hex[:12]
    try:
        folder.mkdir(parents=True)
        shutil.copyfile(preset, folder / Path(preset).name)
    except OSError as exc:
        raise JobError(f"cannot stage preset '{preset}' into working dir '{working_dir}': {exc}") from None
    try:
        yield (folder / Path(preset).name).relative_to(working_dir).as_posix()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        with contextlib.suppress(OSError):
            folder.parent.rmdir()  # only when no other submission is staging


def _warn_run_dir(cfg: config.Config) -> None:
    if not os.path.isabs(cfg.run_dir):
        print(f"warning: run_dir '{cfg.run_dir or 'runs/<timestamp>'}' is relative: the job writes it inside "
              "its temporary working dir on the head node; pass run_dir=/shared/path", file=sys.stderr)


def submit(address: Optional[str], preset: Optional[str], overrides: list[str], no_wait: bool = False,
           working_dir: Optional[str] = None) -> str:
    """Validate the config locally, submit it, print the job id; unless no_wait, follow the logs until the
    job ends and raise JobError if it did not succeed. Returns the job (submission) id."""
    overrides = list(overrides)
    cfg = config.load_config(preset or config.DEFAULT_PRESET, [*overrides, "cluster=ray"])  # ConfigError before uploading
    _warn_run_dir(cfg)
    root = Path(working_dir or os.getcwd()).resolve()
    if not root.is_dir():
        raise JobError(f"working dir '{root}' is not a directory")
    jobs = _client(address)
    print(f"uploading working dir {root} (without git-ignored files and {', '.join(EXCLUDES)})", flush=True)
    with staged_preset(preset, root) as preset_ref, _quiet_ray_client():
        command = entrypoint(preset_ref, overrides)
        try:
            job_id = jobs.submit_job(entrypoint=command, runtime_env=runtime_env(root, cfg.cluster.stop_timeout_s))
        except (RuntimeError, ValueError) as exc:
            raise JobError(f"submitting to {jobs.get_address()} failed: {str(exc).splitlines()[0]}") from None
    print(f"submitted job {job_id} to {jobs.get_address()}: {command}", flush=True)
    if not no_wait:
        _follow(jobs, job_id)
    return job_id


def _follow(jobs, job_id: str) -> str:
    """Stream the job's logs to stdout until it ends; JobError unless it SUCCEEDED. Returns the status."""

    async def tail() -> None:
        async for chunk in jobs.tail_job_logs(job_id):
            print(chunk, end="", flush=True)

    try:
        asyncio.run(tail())
    except KeyboardInterrupt:
        print(f"\nstopped following; job {job_id} keeps running (`dist-moe stop {job_id}` stops it)",
              file=sys.stderr)
        raise
    info = _job_info(jobs, job_id)
    deadline = time.monotonic() + 30.0  # the log stream closes as the job ends; its status follows shortly
    while not info.status.is_terminal() and time.monotonic() < deadline:
        time.sleep(0.5)
        info = _job_info(jobs, job_id)
    if str(info.status) != "SUCCEEDED":
        raise JobError(f"job {job_id} ended {info.status}: {info.message or 'no message'}")
    return str(info.status)


def status(address: Optional[str], job_id: str) -> str:
    """Print and return the job's status (PENDING | RUNNING | SUCCEEDED | FAILED | STOPPED)."""
    info = _job_info(_client(address), job_id)
    print(f"{job_id}: {info.status}" + (f" ({info.message})" if info.message else ""))
    return str(info.status)


def logs(address: Optional[str], job_id: str, follow: bool = False) -> None:
    """Print the job's logs so far; with follow, stream them until the job ends (JobError if it failed)."""
    jobs = _client(address)
    _job_info(jobs, job_id)
    if follow:
        _follow(jobs, job_id)
    else:
        print(jobs.get_job_logs(job_id), end="", flush=True)


def stop(address: Optional[str], job_id: str) -> bool:
    """Ask the cluster to stop the job; True if it was running."""
    jobs = _client(address)
    info = _job_info(jobs, job_id)
    stopped = jobs.stop_job(job_id)
    print(f"{job_id}: stop requested" if stopped else f"{job_id}: not running ({info.status})")
    return stopped
