"""`dist-moe scaling sweep SWEEP.yaml`: a grid of small real training runs as Ray tasks, one row each.

A sweep file names a preset, overrides shared by every run, a list of model sizes (each a name and its
overrides) and either token budgets (`tokens: [...]`, a models x tokens grid) or compute budgets
(`flops: [...]`, isoFLOP: each model trains for D = C / (6 N_active) tokens). Each run is a real
`dist-moe train` in its own process, in RUN_ROOT/<name>; its summary becomes a row of the results table
(N_active, D, C = 6 N_active D, final val loss). Runs whose name is already in the table are skipped, so an
interrupted sweep continues where it stopped. See configs/sweeps/ for examples.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from dist_moe.config import ConfigError, load_config
from dist_moe.scaling.results import Run, ScalingDataError, append_run, read_results


@dataclass
class ModelSize:
    name: str
    overrides: list[str] = field(default_factory=list)


@dataclass
class Sweep:
    preset: str = "tiny"  # preset every run starts from
    results: str = "runs/sweep/results.jsonl"  # the table rows are appended to (.jsonl or .csv)
    run_root: str = "runs/sweep"  # each run's dir is RUN_ROOT/<name>
    overrides: list[str] = field(default_factory=list)  # key=value for every run
    models: list[ModelSize] = field(default_factory=list)  # model sizes: a name and overrides each
    tokens: list[float] = field(default_factory=list)  # token budgets D (models x tokens grid)
    flops: list[float] = field(default_factory=list)  # compute budgets C (isoFLOP: D = C / 6N per model)
    cpus_per_run: int = 1  # Ray CPUs reserved by each run
    gpus_per_run: float = 0.0  # Ray GPUs reserved by each run
    address: str = ""  # Ray cluster; empty = a local one started on the fly


@dataclass
class PlannedRun:
    name: str
    args: list[str]  # preset + overrides for `dist-moe train`
    n_active: int
    num_experts: int
    steps: int
    tokens: int  # tokens the run will see: steps * tokens per step


def load_sweep(path: str | Path) -> Sweep:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file '{path}' does not exist")
    try:
        sweep: Sweep = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Sweep), OmegaConf.load(path)))
    except Exception as exc:  # omegaconf's messages name the key
        raise ConfigError(f"{path}: {str(exc).splitlines()[0]}") from None
    if not sweep.models:
        raise ConfigError(f"{path}: 'models' is empty; list model sizes as {{name: ..., overrides: [...]}}")
    if bool(sweep.tokens) == bool(sweep.flops):
        raise ConfigError(f"{path}: give exactly one of 'tokens' (a grid) or 'flops' (isoFLOP budgets)")
    if any(value <= 0 for value in [*sweep.tokens, *sweep.flops]):
        raise ConfigError(f"{path}: token and FLOP budgets must be positive")
    return sweep


def plan(sweep: Sweep) -> list[PlannedRun]:
    """Every run of the sweep, with its step count; configs are validated here, before anything starts."""
    from dist_moe.model.transformer import Transformer, num_parameters

    runs = []
    for model in sweep.models:
        base = [*sweep.overrides, *model.overrides]
        cfg = load_config(sweep.preset, base)
        cfg.model.vocab_size = cfg.model.vocab_size or cfg.data.vocab_size
        _, n_active = num_parameters(Transformer(cfg))
        tokens_per_step = cfg.train.micro_batch_size * cfg.train.grad_accum_steps * cfg.data.seq_len
        budgets = sweep.tokens or [c / (6 * n_active) for c in sweep.flops]
        labels = [f"D{t:.3g}" for t in sweep.tokens] or [f"C{c:.3g}" for c in sweep.flops]
        for budget, label in zip(budgets, labels):
            steps = max(1, math.ceil(budget / tokens_per_step))
            runs.append(PlannedRun(f"{model.name}-{label}", [sweep.preset, *base, f"train.max_steps={steps}"],
                                   n_active, cfg.moe.num_experts if cfg.moe.moe_every else 1, steps,
                                   steps * tokens_per_step))
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ConfigError("sweep: two runs share a name; give every model size a distinct name")
    return runs


def _train(args: list[str], run_dir: str) -> dict:
    """One run in its own process (a fresh process group each time), returning its summary.json."""
    cmd = [sys.executable, "-m", "dist_moe.cli", "train", *args, f"run_dir={run_dir}", "cluster.kind=local",
           "resume=auto"]  # a run that failed half-way continues from its last checkpoint
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        return {"error": (result.stderr.strip().splitlines() or ["exit code %d" % result.returncode])[-1]}
    summary = json.loads((Path(run_dir) / "summary.json").read_text())
    if not summary.get("completed", True):  # a signal stopped it early (it saved a checkpoint): not a sweep point
        return {"error": f"stopped at step {summary['step']} of {summary['max_steps']}, not recorded "
                         "(running the sweep again resumes it)"}
    return summary


def run_sweep(path: str | Path, show_progress: bool = True) -> int:
    """Run what the sweep file asks for and is not yet in its results table; returns the number of failures."""
    import ray
    from tqdm import tqdm

    from dist_moe.cluster.trainer import init_ray

    sweep = load_sweep(path)
    planned = plan(sweep)
    done = _finished_names(Path(sweep.results))
    todo = [r for r in planned if r.name not in done]
    print(f"sweep {path}: {len(planned)} runs, {len(planned) - len(todo)} already in {sweep.results}, "
          f"{len(todo)} to run", flush=True)
    if not todo:
        return 0
    unique_tokens = _prepare_data_once(sweep)
    print(_epochs_note(max(todo, key=lambda r: r.tokens), unique_tokens), flush=True)
    init_ray(sweep.address)
    task = ray.remote(num_cpus=sweep.cpus_per_run, num_gpus=sweep.gpus_per_run)(_train)
    pending = {task.remote(r.args, str(Path(sweep.run_root).resolve() / r.name)): r for r in todo}
    failures = 0
    with tqdm(total=len(todo), desc="sweep runs", disable=not show_progress) as bar:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            run, summary = pending.pop(ready[0]), ray.get(ready[0])
            if "error" in summary:
                failures += 1
                bar.write(f"{run.name}: failed: {summary['error']}")
            else:
                append_run(sweep.results, Run(run.name, run.num_experts, summary["n_total"], run.n_active,
                                              summary["tokens"], 6.0 * run.n_active * summary["tokens"],
                                              summary["val_loss"]))
                bar.write(f"{run.name}: N_active={run.n_active:,} D={summary['tokens']:,} "
                          f"val loss {summary['val_loss']:.4f}")
            bar.update(1)
    return failures


def _finished_names(results: Path) -> set[str]:
    if not results.exists() or results.stat().st_size == 0:
        return set()
    try:
        return set(read_results(results).name)
    except ScalingDataError as exc:
        raise ConfigError(f"results table {results} cannot be read to skip finished runs: {exc}") from None


def _prepare_data_once(sweep: Sweep) -> int:
    """Tokenizer and shards for the first run's data settings, so parallel runs find them cached; returns
    the unique training tokens."""
    import tempfile

    from dist_moe.data import prepare_data

    cfg = load_config(sweep.preset, [*sweep.overrides, *sweep.models[0].overrides])
    with tempfile.TemporaryDirectory() as scratch:
        return prepare_data(cfg.data, Path(scratch), show_progress=False).train_tokens


def _epochs_note(largest: PlannedRun, unique_tokens: int) -> str:
    """How often the largest run sees its data: a fit assumes fresh tokens, and repeats are worth less."""
    epochs = largest.tokens / unique_tokens
    note = f"data: {unique_tokens:,} unique training tokens; the largest run ({largest.name}) reads {epochs:.2f} epochs"
    if epochs <= 1:
        return note
    return (note + ": tokens repeat, which the fitted law does not model (up to ~4 epochs cost little, "
            "Muennighoff et al. 2023); data.corpus=site-packages or a larger data.max_corpus_mb gives more")
