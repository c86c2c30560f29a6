"""`dist-moe`: the command line. Each subcommand parses its arguments and calls one function elsewhere."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path

from dist_moe import config
from dist_moe.errors import run_guarded

def _default_run_dir(preset: str | None) -> str:
    name = Path(preset).stem if preset else config.DEFAULT_PRESET
    return str(Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{name}")


def _split_preset(items: list[str]) -> tuple[str | None, list[str]]:
    """`[PRESET] key=value ...`: the first item is a preset when it is not an override."""
    if items and "=" not in items[0]:
        return items[0], items[1:]
    return None, items


def cmd_train(args: argparse.Namespace) -> int:
    preset, overrides = _split_preset(args.items)
    cfg = config.load_config(preset or config.DEFAULT_PRESET, overrides)
    if not cfg.run_dir:
        cfg.run_dir = _default_run_dir(preset)
    return _launch(cfg, args)


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from dist_moe.data import prepare

    preset, overrides = _split_preset(args.items)
    cfg = config.load_config(preset or config.DEFAULT_PRESET, overrides)
    print(prepare(cfg.data, cfg.cluster, show_progress=True, verify=args.verify))
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    saved = run_dir / "config.yaml"
    if not run_dir.is_dir():
        raise config.ConfigError(f"run dir '{run_dir}' does not exist")
    if not saved.is_file():
        raise config.ConfigError(f"run dir '{run_dir}' has no config.yaml (is it a dist-moe run dir?)")
    cfg = config.load_config(str(saved), [*args.overrides, f"run_dir={run_dir}", "resume=auto"])
    return _launch(_fit_to_ranks(cfg, run_dir, args), args)


def _fit_to_ranks(cfg: config.Config, run_dir: Path, args: argparse.Namespace) -> config.Config:
    """A resume on another number of ranks (another launcher, --nproc, cluster.num_workers) keeps the global
    batch, and so every step's data, as an elastic Ray run does (config.fit_to_workers): the micro batch scales
    with the rank count and moe.ep_size becomes gcd(ep_size, ranks). Keys given on the command line win."""
    from dist_moe.train.checkpoint_reader import candidates

    found = candidates(run_dir)
    saved_ranks = len(list(found[0].glob("trainer_rank*.pt"))) if found else 0  # one file per rank that saved
    ranks = cfg.cluster.num_workers if cfg.cluster.kind == "ray" else args.nproc
    given = {item.split("=", 1)[0] for item in args.overrides}
    if not saved_ranks or saved_ranks == ranks or given & {"train.micro_batch_size", "moe.ep_size"}:
        return cfg
    t = cfg.train
    if t.micro_batch_size * saved_ranks % ranks:
        raise config.ConfigError(
            f"the checkpoint's global batch ({t.micro_batch_size} x {t.grad_accum_steps} x {saved_ranks} ranks) does "
            f"not split over {ranks} ranks: set train.micro_batch_size (and train.grad_accum_steps) so that "
            f"micro x accum x {ranks} = {t.micro_batch_size * t.grad_accum_steps * saved_ranks}")
    as_saved = dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, num_workers=saved_ranks))
    fitted = dataclasses.replace(config.fit_to_workers(as_saved, ranks), cluster=cfg.cluster)
    print(f"resume on {ranks} rank(s), saved on {saved_ranks}: train.micro_batch_size {t.micro_batch_size} -> "
          f"{fitted.train.micro_batch_size}, moe.ep_size {cfg.moe.ep_size} -> {fitted.moe.ep_size} (the global batch "
          f"stays {t.micro_batch_size * t.grad_accum_steps * saved_ranks}; both are saved in config.yaml)",
          file=sys.stderr, flush=True)
    return fitted


def cmd_dpo(args: argparse.Namespace) -> int:
    from dist_moe.train.dpo import dpo_config

    parent = Path(args.run_dir)
    if not parent.is_dir():
        raise config.ConfigError(f"run dir '{parent}' does not exist")
    cfg = dpo_config(parent, args.overrides, _default_run_dir(f"{parent.name}-dpo"))
    return _launch(cfg, args)


# What a run writes before its first step; all of it is rebuilt from the config and the data cache (or, for
# the heartbeat files, by the next run's ranks).
_REBUILT_FILES = {"config.yaml", "launch_config.yaml", "tokenizer.model", "data.json"}
_REBUILT_DIRS = {"heartbeats"}


def _launch(cfg: config.Config, args: argparse.Namespace) -> int:
    """Start the run; if it fails and its run dir is one this call created and holds nothing but what a rerun
    rebuilds, remove the dir, so that a typo leaves no empty run behind (never a dir that existed before)."""
    ranks = cfg.cluster.num_workers if cfg.cluster.kind == "ray" else args.nproc
    config.check_world_size(cfg, ranks)
    run_dir = Path(cfg.run_dir)
    created, code = not run_dir.exists(), 1
    try:
        code = _start(cfg, args)
        return code
    finally:
        if created and code != 0 and run_dir.is_dir() and _holds_only_rebuilt_files(run_dir):
            shutil.rmtree(run_dir)


def _holds_only_rebuilt_files(run_dir: Path) -> bool:
    return all(path.is_dir() or path.name in _REBUILT_FILES or path.parent.name in _REBUILT_DIRS
               for path in run_dir.rglob("*"))


def _start(cfg: config.Config, args: argparse.Namespace) -> int:
    if cfg.cluster.kind == "ray":
        from dist_moe.cluster.trainer import train_on_ray

        return train_on_ray(cfg)
    if args.nproc > 1:
        from dist_moe.train.launch import launch_local

        return launch_local(cfg, args.nproc, debug=args.debug)
    from dist_moe.train.loop import run

    run(cfg)
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from dist_moe.cluster import jobs

    preset, overrides = _split_preset(args.items)
    jobs.submit(args.address, preset, overrides, no_wait=args.no_wait, working_dir=args.working_dir)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    if Path(args.job_id).is_dir():  # a run dir (a job id is never one): progress, history, every rank's heartbeat
        from dist_moe.train.progress import run_status

        print(run_status(Path(args.job_id)))
        return 0
    if os.sep in args.job_id or args.job_id.startswith(("~", ".")):  # Ray job ids hold no path separator
        raise config.ConfigError(f"run dir '{args.job_id}' does not exist (expected a run dir or a Ray job id)")
    from dist_moe.cluster import jobs

    jobs.status(args.address, args.job_id)
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    from dist_moe.cluster import jobs

    jobs.logs(args.address, args.job_id, follow=args.follow)
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    from dist_moe.cluster import jobs

    jobs.stop(args.address, args.job_id)
    return 0


def cmd_scaling_fit(args: argparse.Namespace) -> int:
    from dist_moe.scaling.report import run_fit

    out = args.out or str(Path(args.results).with_suffix("")) + "_plots"
    print(run_fit(args.results, budget=args.budget, bootstrap=args.bootstrap, out_dir=out,
                  approach=args.approach, grid=args.grid, exclude_highest=args.exclude_highest,
                  fix_exponents=args.fix_exponents, min_tokens_per_param=args.min_tokens_per_param))
    return 0


def _add_min_tokens_per_param(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--min-tokens-per-param", type=float, default=0.0, metavar="R",
                        help="Approach 3 fits only runs with D/N >= R: runs far on the large-model side of their "
                             "budget are still near their first steps' loss plateau (docs/scaling.md)")


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}': expected numbers separated by commas, e.g. 0,4,16") from None
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"'{text}': tokens per parameter cannot be negative")
    return values


def _exponent_pair(text: str) -> tuple[float, float]:
    """--fix-exponents ALPHA,BETA: two positive numbers."""
    try:
        alpha, beta = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}': expected ALPHA,BETA, e.g. 0.3473,0.3672") from None
    if not (alpha > 0 and beta > 0):
        raise argparse.ArgumentTypeError(f"'{text}': both exponents must be positive")
    return alpha, beta


def cmd_scaling_predict(args: argparse.Namespace) -> int:
    from dist_moe.scaling.predict import predict

    record = predict(args.results, args.budget, args.sweep, bootstrap_resamples=args.bootstrap, grid=args.grid,
                     min_tokens_per_param=args.min_tokens_per_param)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"at C = {args.budget:.3g}: N_opt {record['n_active']:.4g} {record['n_active_interval']}, D_opt "
          f"{record['tokens']:.4g}, predicted loss {record['predicted_loss']:.4f} {record['interval']}; "
          f"Approach 2: {record['approach2'].get('n_active', record['approach2'].get('error'))}; written to {args.out}")
    for warning in record["warnings"]:
        print(f"  warning: {warning}")
    for run in record.get("runs", []):
        print(f"  {run['name']}: N {run['n_active']:,} D {run['tokens']:,} predicted loss "
              f"{run['predicted_loss']:.4f} {run['interval']}")
    return 0


def cmd_scaling_backtest(args: argparse.Namespace) -> int:
    from dist_moe.scaling.predict import backtest

    print(backtest(args.results, args.budget, args.span, args.min_tokens_per_param, grid=args.grid))
    return 0


def cmd_scaling_check(args: argparse.Namespace) -> int:
    from dist_moe.scaling.predict import check

    record, text = check(args.prediction, args.results, args.plot)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(text + f"\nwritten to {args.out}")
    return 0


def cmd_scaling_sweep(args: argparse.Namespace) -> int:
    from dist_moe.scaling.sweep import run_sweep

    return 1 if run_sweep(args.sweep) else 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from dist_moe.analysis.expert_load import analyze

    print(analyze(args.run_dir, last_n=args.last, out_dir=args.out))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    if args.from_hf:
        from dist_moe.hf.load import generate_from_hf

        print(generate_from_hf(args.from_hf, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed))
        return 0
    if not args.run_dir:
        raise config.ConfigError("dist-moe generate: expected RUN_DIR or --from-hf PATH")
    from dist_moe.train.generate import generate_text

    sample = generate_text(args.run_dir, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed)
    print(sample.text)
    print(sample.speed(), file=sys.stderr)  # stdout holds the sample alone
    return 0


def export_run(run_dir: str | Path, out_dir: str | Path, step: int | None = None, dtype: str = "fp32",
               max_shard_bytes: int = 5 * 2**30) -> Path:
    """`dist-moe export`: read run_dir's checkpoint (newest, or `step`) -> transformers' names -> out_dir."""
    from dist_moe.hf import adapter, export
    from dist_moe.hf.tokenizer import convert
    from dist_moe.train.checkpoint_reader import read_model_state

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if not (run_dir / "config.yaml").is_file():
        raise config.ConfigError(f"run dir '{run_dir}' has no config.yaml (is it a dist-moe run dir?)")
    export.check_target(out_dir, dtype)
    cfg = config.from_yaml_file(run_dir / "config.yaml")
    adapter.architecture(cfg)  # refuse before reading anything large
    tokenizer = convert(run_dir / "tokenizer.model")
    _, state = read_model_state(run_dir, step)
    return export.write_folder(adapter.to_hf(state, cfg), cfg, tokenizer, run_dir / "tokenizer.model", out_dir,
                               dtype, max_shard_bytes)


def cmd_export(args: argparse.Namespace) -> int:
    out = export_run(args.run_dir, args.out_dir, step=args.step, dtype=args.dtype,
                 max_shard_bytes=int(args.max_shard_gb * 2**30))
    print(f"exported to {out} (load it with transformers' AutoModelForCausalLM / AutoTokenizer.from_pretrained)")
    return 0


def cmd_tensorboard(args: argparse.Namespace) -> int:
    """TensorBoard replaces this process (exec), so stopping this PID stops the server; it prints its own URL once
    it serves. A busy port is refused here, as one line, before TensorBoard starts."""
    import socket

    logdir = Path(args.run_dir) / "tb"
    if not logdir.is_dir():
        raise config.ConfigError(f"'{logdir}' does not exist (no TensorBoard events in that run dir)")
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds
        try:
            probe.bind((args.host, args.port))
        except OSError as exc:
            raise config.ConfigError(f"port {args.port} on {args.host} is not free ({exc.strerror}): pick "
                                     f"another with --port") from None
    cmd = [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", args.host,
           "--port", str(args.port)]
    sys.stdout.flush()
    os.execv(sys.executable, cmd)


def _add_training_commands(sub, common: argparse.ArgumentParser) -> None:
    """train, data prepare, resume, dpo: the commands that start or continue training."""
    train = sub.add_parser(
        "train", help="train a model", parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter,
        description=f"Train an MoE language model. PRESET is a shipped preset name (tiny, small, medium) or "
                    f"a YAML file, {config.DEFAULT_PRESET} when left out; key=value pairs override single config keys.",
        epilog=f"config keys (key, value under the {config.DEFAULT_PRESET} preset, meaning):\n"
               + config.help_text(config.DEFAULT_PRESET))
    train.add_argument("items", nargs="*", metavar="[PRESET] key=value", help="preset and overrides")
    train.add_argument("--nproc", type=int, default=1, help="worker processes on this machine (gloo/nccl)")
    train.set_defaults(fn=cmd_train)

    data = sub.add_parser("data", help="data preparation", parents=[common])
    data_sub = data.add_subparsers(dest="data_command", required=True)
    data_prepare = data_sub.add_parser(
        "prepare", help="build the tokenizer and token shards of a config's data.* (docs/data.md)",
        parents=[common], description="Build (or find, or repair) the prepared folder of the config's data "
        "sources: tokenizer, token shards, manifest; prints its path. In-process below data.ray_threshold_mb, "
        "else on Ray Data (cluster.address, or a local Ray). Keys as for `dist-moe train`.")
    data_prepare.add_argument("items", nargs="*", metavar="[PRESET|CONFIG] key=value", help="preset and overrides")
    data_prepare.add_argument("--verify", action="store_true", help="hash every shard against the manifest "
                              "(rebuilding a bad one), not only its size")
    data_prepare.set_defaults(fn=cmd_data_prepare)

    resume = sub.add_parser("resume", help="continue a run from its latest complete checkpoint",
                            parents=[common])
    resume.add_argument("run_dir")
    resume.add_argument("overrides", nargs="*", metavar="key=value",
                        help="e.g. train.max_steps=600 (model and data keys cannot change)")
    resume.add_argument("--nproc", type=int, default=1, help="worker processes on this machine")
    resume.set_defaults(fn=cmd_resume)

    dpo = sub.add_parser(
        "dpo", help="preference-tune a run's model with DPO, into a new run dir", parents=[common],
        description="Start from RUN_DIR's newest checkpoint and train on preference pairs (data.prefs: a .jsonl "
                    "of {prompt, chosen, rejected} rows) with DPO or IPO, writing a new run dir (run_dir=, "
                    "default runs/<time>-<parent>-dpo) whose config records its parent. "
                    "Continue it with `dist-moe resume`. See docs/dpo.md; `dist-moe train --help` lists every "
                    "config key (dpo.* and data.prefs among them).")
    dpo.add_argument("run_dir", help="the pretraining run to start from")
    dpo.add_argument("overrides", nargs="*", metavar="key=value", help="data.prefs=FILE.jsonl and any others")
    dpo.add_argument("--nproc", type=int, default=1, help="worker processes on this machine")
    dpo.set_defaults(fn=cmd_dpo)


def _add_job_commands(sub, common: argparse.ArgumentParser) -> None:
    """submit, status, logs, stop: a Ray cluster's jobs (status also reads a run dir)."""
    address = argparse.ArgumentParser(add_help=False)
    address.add_argument("--address", default=None, help="Ray job server, e.g. http://HEAD:8265 "
                         "(default: $RAY_ADDRESS, else http://127.0.0.1:8265)")
    submit = sub.add_parser("submit", help="submit a run to a Ray cluster's job server", parents=[common, address])
    submit.add_argument("items", nargs="*", metavar="[PRESET] key=value", help="preset and overrides")
    submit.add_argument("--no-wait", action="store_true", help="print the job id and return")
    submit.add_argument("--working-dir", default=None, help="directory uploaded with the job (default: current)")
    submit.set_defaults(fn=cmd_submit)
    for name, fn, text in (("status", cmd_status, "a submitted job's status, or a run dir's: progress and each "
                                                  "rank's heartbeat"), ("logs", cmd_logs, "a job's logs"),
                           ("stop", cmd_stop, "stop a submitted job")):
        job = sub.add_parser(name, help=text, parents=[common, address])
        job.add_argument("job_id", metavar="JOB_ID|RUN_DIR" if name == "status" else "JOB_ID")
        if name == "logs":
            job.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
        job.set_defaults(fn=fn)


def _add_scaling_commands(sub, common: argparse.ArgumentParser) -> None:
    """scaling sweep | fit | predict | check."""
    scaling = sub.add_parser("scaling", help="scaling laws: sweep small runs, fit Chinchilla curves", parents=[common])
    scaling_sub = scaling.add_subparsers(dest="scaling_command", required=True)
    sweep = scaling_sub.add_parser("sweep", help="run a grid of small training runs as Ray tasks", parents=[common])
    sweep.add_argument("sweep", help="sweep YAML (see configs/sweeps/)")
    sweep.set_defaults(fn=cmd_scaling_sweep)
    fit = scaling_sub.add_parser("fit", help="fit L(N, D) = E + A/N^alpha + B/D^beta to a results table",
                                 parents=[common])
    fit.add_argument("results", help="results table (.jsonl/.csv from a sweep, or Epoch's Chinchilla CSV)")
    fit.add_argument("--budget", type=float, default=None, help="FLOPs to recommend N and D for, e.g. 1e21")
    fit.add_argument("--bootstrap", type=int, default=100, help="resamples for confidence intervals (0 = none)")
    fit.add_argument("--out", default=None, help="directory for the plots (default: RESULTS_plots beside the table)")
    fit.add_argument("--approach", default="3", choices=("3", "2", "both"), help="Chinchilla approach")
    fit.add_argument("--grid", default="paper", choices=("paper", "coarse"), help="L-BFGS initialisations")
    fit.add_argument("--exclude-highest", type=int, default=0, metavar="K",
                     help="drop the K highest-loss runs before fitting (Epoch dropped 5 Chinchilla runs)")
    fit.add_argument("--fix-exponents", type=_exponent_pair, default=None, metavar="ALPHA,BETA",
                     help="hold alpha and beta fixed in Approach 3 (default: fitted; Epoch's 0.3473,0.3672 "
                          "when there are too few runs for all five parameters)")
    _add_min_tokens_per_param(fit)
    fit.set_defaults(fn=cmd_scaling_fit)
    predict = scaling_sub.add_parser("predict", help="fit a results table and write its prediction for runs it "
                                     "has not seen (commit it before running them)", parents=[common])
    predict.add_argument("results", help="results table to fit (one expert count)")
    predict.add_argument("--budget", type=float, required=True, help="FLOPs to predict the optimum at")
    predict.add_argument("--sweep", default=None, help="held-out sweep YAML: predict each run it plans")
    predict.add_argument("--bootstrap", type=int, default=100, help="resamples for the intervals")
    predict.add_argument("--grid", default="paper", choices=("paper", "coarse"), help="L-BFGS initialisations")
    predict.add_argument("--out", required=True, help="prediction JSON to write")
    _add_min_tokens_per_param(predict)
    predict.set_defaults(fn=cmd_scaling_predict)
    backtest = scaling_sub.add_parser("backtest", help="fit a sweep's small budgets and predict its largest, to "
                                      "choose fit settings before held-out runs", parents=[common])
    backtest.add_argument("results", help="results table (one expert count)")
    backtest.add_argument("--budget", type=float, required=True, help="the swept budget C to predict")
    backtest.add_argument("--span", type=float, default=4.0, help="fit the budgets up to C / SPAN (default 4)")
    backtest.add_argument("--min-tokens-per-param", type=_floats, default=[0.0], metavar="R[,R...]",
                          help="Approach 3 fits only runs with D/N >= R; one line per R")
    backtest.add_argument("--grid", default="paper", choices=("paper", "coarse"), help="L-BFGS initialisations")
    backtest.set_defaults(fn=cmd_scaling_backtest)
    check = scaling_sub.add_parser("check", help="compare a held-out sweep's losses with a prediction JSON",
                                   parents=[common])
    check.add_argument("prediction", help="JSON written by `scaling predict --sweep`")
    check.add_argument("results", help="the held-out sweep's results table")
    check.add_argument("--out", required=True, help="measured-versus-predicted JSON to write")
    check.add_argument("--plot", default=None, help="PNG of the fitted isoFLOP curves with the held-out runs")
    check.set_defaults(fn=cmd_scaling_check)


def _add_run_dir_commands(sub, common: argparse.ArgumentParser) -> None:
    """analyze, generate, export, tensorboard: what reads a finished run dir."""
    analyze = sub.add_parser("analyze", help="expert-load report of a run (from its TensorBoard events)",
                             parents=[common])
    analyze.add_argument("run_dir")
    analyze.add_argument("--last", type=int, default=5, help="logs that count for dead experts and the trend")
    analyze.add_argument("--out", default=None, help="directory for the PNG plots (default: RUN_DIR/expert_load)")
    analyze.set_defaults(fn=cmd_analyze)

    gen = sub.add_parser("generate", help="sample text from a run's newest checkpoint (or a transformers folder)",
                         parents=[common])
    gen.add_argument("run_dir", nargs="?")
    gen.add_argument("--from-hf", default=None, metavar="PATH", help="sample from a transformers MoE folder "
                     "(Mixtral, Qwen2-MoE) with its tokenizer instead of a run")
    gen.add_argument("--prompt", default="def ", help="text to continue")
    gen.add_argument("--max-new-tokens", type=int, default=200)
    gen.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    gen.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens (0 = all)")
    gen.add_argument("--seed", type=int, default=0)
    gen.set_defaults(fn=cmd_generate)

    export = sub.add_parser("export", help="write a run's checkpoint as a Hugging Face transformers folder",
                            parents=[common])
    export.add_argument("run_dir")
    export.add_argument("out_dir", help="new folder for the safetensors, config and tokenizer")
    export.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    export.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="weight dtype in the files")
    export.add_argument("--max-shard-gb", type=float, default=5.0, help="split the weights into files of at most "
                        "this size (GiB)")
    export.set_defaults(fn=cmd_export)

    tb = sub.add_parser("tensorboard", help="start TensorBoard on a run dir", parents=[common])
    tb.add_argument("run_dir")
    tb.add_argument("--host", default="127.0.0.1", help="bind address (default: localhost only)")
    tb.add_argument("--port", type=int, default=6006)
    tb.set_defaults(fn=cmd_tensorboard)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks")
    parser = argparse.ArgumentParser(prog="dist-moe", parents=[common], description="dist_moe: distributed "
                                     "expert-parallel training of Mixture-of-Experts language models")
    sub = parser.add_subparsers(dest="command", required=True)
    for add_commands in (_add_training_commands, _add_job_commands, _add_scaling_commands,
                         _add_run_dir_commands):
        add_commands(sub, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not sys.stderr.isatty():  # a log file (SLURM, Ray, nohup): progress bars redraw every 30 s, not 10 times a
        os.environ.setdefault("TQDM_MININTERVAL", "30")  # second (tqdm reads it on import; workers inherit it)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)  # key=value items may also come after options
    positional = getattr(args, "items", getattr(args, "overrides", None))
    if extra and (positional is None or any(item.startswith("-") for item in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        positional.extend(extra)
    args.debug = "--debug" in argv
    return run_guarded(lambda: _into_a_closed_pipe(args.fn, args), args.debug)


def _into_a_closed_pipe(fn, args: argparse.Namespace) -> int:
    """`dist-moe status RUN_DIR | head`: when the reader closes the pipe, stop writing quietly, as cat does."""
    try:
        code = fn(args)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the interpreter flushes stdout at exit
        return 0


if __name__ == "__main__":
    sys.exit(main())
