"""Structured configuration: one dataclass per concern, YAML presets and dotlist overrides on top.

Every field carries its meaning as `help` metadata, which `dist-moe train --help` prints. Loading goes
preset -> overrides -> validation; every user mistake becomes a `ConfigError` whose message is one line
naming the key and what was expected.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dist_moe.errors import UserError


DEFAULT_PRESET = "tiny"  # what `dist-moe train` runs without a preset


def _preset_dir() -> Path:
    """configs/ ships inside the package as dist_moe.presets (see pyproject.toml)."""
    from importlib.resources import files

    return Path(str(files("dist_moe.presets")))


class ConfigError(UserError, ValueError):
    """A user-facing configuration mistake; the message is a single line naming the key."""


def _f(default: Any, help: str, choices: Optional[dict[str, str]] = None) -> Any:
    """A config field with its meaning (`help`) and, for a string key, its allowed values, each with an optional
    note: the one source of the values that `validate` accepts and `--help` lists."""
    if choices:
        help += ": " + " | ".join(f"{value} ({note})" if note else value for value, note in choices.items())
    metadata = {"help": help, "choices": tuple(choices or ())}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: default, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class ModelConfig:
    vocab_size: int = _f(0, "vocabulary size; 0 = take it from the tokenizer (data.vocab_size)")
    d_model: int = _f(256, "width of the residual stream")
    num_layers: int = _f(4, "number of transformer blocks")
    num_heads: int = _f(8, "query heads")
    num_kv_heads: int = _f(2, "key/value heads (GQA); num_heads = MHA, 1 = MQA")
    head_dim: int = _f(0, "per-head width; 0 = d_model // num_heads")
    d_ff: int = _f(512, "hidden width of the dense SwiGLU FFN (layers without MoE)")
    max_seq_len: int = _f(256, "longest sequence the model is run on")
    attention_window: int = _f(0, "sliding-window attention width (Mistral-style); 0 = full causal")
    attention: str = _f("full", "attention", {"full": "causal", "moba": "mixture of block attention, the moba.* keys"})
    qk_norm: bool = _f(False, "RMSNorm each head's q and k over head_dim before RoPE (Qwen3), eps = norm_eps")
    rope_theta: float = _f(10000.0, "RoPE base")
    # RoPE scaling keys are transformers' rope_parameters names with a rope_ prefix (docs/export.md)
    rope_scaling: str = _f("none", "context extension (transformers' rope_type)",
                           {"none": "", "linear": "", "ntk": "", "yarn": ""})
    rope_factor: float = _f(1.0, "scale s = target context / original context")
    rope_original_max_position_embeddings: int = _f(256, "context length the model was (pre)trained at")
    rope_beta_fast: float = _f(32.0, "YaRN: rotations above which a dimension is left unscaled")
    rope_beta_slow: float = _f(1.0, "YaRN: rotations below which a dimension is fully interpolated")
    rope_attention_factor: float = _f(0.0, "YaRN: cos/sin scale; 0 = from rope_factor (and the two mscales)")
    rope_mscale: float = _f(0.0, "YaRN: attention factor = mscale(s, mscale) / mscale(s, mscale_all_dim); "
                                 "0 = unset")
    rope_mscale_all_dim: float = _f(0.0, "YaRN: see rope_mscale; 0 = unset")
    rope_truncate: bool = _f(True, "YaRN: round the blend band's dimension bounds to integers (floor/ceil)")
    norm_eps: float = _f(1e-5, "RMSNorm epsilon")
    init_std: float = _f(0.02, "std of the normal weight init")
    tie_embeddings: bool = _f(True, "share the input embedding with the output projection")


def _check_model(cfg: Config, need: _Need) -> None:
    m = cfg.model
    need.positive("model.d_model", "model.num_layers", "model.num_heads", "model.num_kv_heads", "model.d_ff",
                  "model.max_seq_len")
    need(m.num_heads % m.num_kv_heads == 0, "model.num_kv_heads", f"a divisor of model.num_heads={m.num_heads}")
    need(m.head_dim > 0 or m.d_model % m.num_heads == 0, "model.num_heads",
         f"a divisor of model.d_model={m.d_model} (or set model.head_dim)")
    need(m.head_dim >= 0 and (m.head_dim or m.d_model // m.num_heads) % 2 == 0, "model.head_dim",
         "an even head width (RoPE rotates pairs)")
    need(m.vocab_size >= 0, "model.vocab_size", "0 (from the tokenizer) or a positive integer")
    need(m.attention_window >= 0, "model.attention_window", "0 (off) or a positive window")
    need(m.rope_factor >= 1.0, "model.rope_factor", ">= 1 (1 = no scaling)")
    need(m.rope_beta_fast > m.rope_beta_slow > 0, "model.rope_beta_fast", "> model.rope_beta_slow > 0")
    for key in ("model.rope_attention_factor", "model.rope_mscale", "model.rope_mscale_all_dim"):
        need(_get(cfg, key) >= 0, key, ">= 0 (0 = unset)")
    need(m.rope_theta > 0, "model.rope_theta", "a positive base")


@dataclass
class MoEConfig:
    num_experts: int = _f(8, "experts per MoE layer")
    top_k: int = _f(2, "experts each token is routed to")
    moe_every: int = _f(1, "an MoE FFN every N layers (1 = all layers, 0 = no MoE)")
    d_expert: int = _f(0, "hidden width of each SwiGLU expert; 0 = model.d_ff")
    capacity_factor: float = _f(1.25, "training capacity = factor * tokens * k / experts")
    eval_capacity_factor: float = _f(2.0, "capacity factor used in eval mode")
    min_capacity: int = _f(4, "lower bound on the per-expert capacity")
    dropless: bool = _f(False, "never drop tokens (capacity = whatever arrives)")
    drop_policy: str = _f("position", "which tokens overflow first",
                          {"position": "later tokens", "probs": "lowest gate"})
    overflow: str = _f("drop", "an assignment over capacity",
                       {"drop": "", "reroute": "to its token's next-best expert with room"})
    reroute_tries: int = _f(2, "overflow=reroute: rounds of moving to the next-best expert with room, then drop")
    routing: str = _f("token_choice", "who picks", {
        "token_choice": "each token picks k experts",
        "expert_choice": "each expert picks its top-C tokens of the rank's batch; not causal, see docs/routing.md"})
    score: str = _f("softmax", "router scores",
                    {"softmax": "", "sigmoid": "DeepSeek-V3: top-k weights normalised to sum 1"})
    balance: str = _f("aux", "load balancing", {"aux": "loss", "aux_free": "selection bias", "both": "", "none": ""})
    aux_loss_scope: str = _f("micro_batch", "aux loss load fractions over", {
        "micro_batch": "", "sequence": "", "global_batch": "all-reduced over the data-parallel ranks"})
    aux_loss_accumulate: bool = _f(False, "aux_loss_scope=global_batch: also accumulate the load fractions over "
                                          "the step's micro batches")
    bias_update_rate: float = _f(1e-3, "balance=aux_free|both: gamma of bias += gamma * sign(mean load - load)")
    noise: str = _f("none", "router noise", {"none": "", "learned": "Shazeer 2017", "jitter": "", "rsample": "DeepSpeed"})
    noise_eps: float = _f(1e-2, "jitter: multiplicative noise range on the router input")
    normalize_weights: bool = _f(True, "renormalise the k kept gate weights to sum to 1 (k >= 2)")
    aux_loss_coef: float = _f(0.01, "Switch load-balancing loss coefficient (balance=aux|both)")
    z_loss_coef: float = _f(0.001, "router z-loss coefficient")
    shared_expert: bool = _f(False, "add a dense shared expert beside the routed ones")
    ep_size: int = _f(1, "expert-parallel size: experts are split over this many ranks")
    a2a_chunks: int = _f(1, "EP exchange in this many chunks of local experts, overlapped with expert compute")
    exchange: str = _f("ragged", "EP exchange layout", {
        "ragged": "kept rows, one host sync per layer",
        "padded": "capacity slots per expert, sync-free; dropless pads to the token count",
        "bounded": "dropless: a learned bound of rows per peer, one host sync per forward"})
    bound_factor: float = _f(1.25, "exchange=bounded: first bound on rows per peer, x the balanced load (grows "
                                   "when a forward overflows it, which is then redone)")
    a2a: str = _f("flat", "EP all-to-all", {"flat": "", "hierarchical": "inside each node, then once across nodes"})
    impl: str = _f("dist_moe", "MoE implementation",
                   {"dist_moe": "", "deepspeed": "deepspeed.moe.layer.MoE baseline"})


def _check_moe(cfg: Config, need: _Need) -> None:
    moe = cfg.moe
    need.positive("moe.num_experts", "moe.top_k", "moe.ep_size")
    need(moe.top_k <= moe.num_experts, "moe.top_k", f"<= moe.num_experts={moe.num_experts}")
    need(moe.num_experts % moe.ep_size == 0, "moe.ep_size", f"a divisor of moe.num_experts={moe.num_experts}")
    need(1 <= moe.a2a_chunks <= moe.num_experts // moe.ep_size, "moe.a2a_chunks",
         f"1 .. experts per rank ({moe.num_experts // moe.ep_size})")
    need(moe.moe_every >= 0, "moe.moe_every", "0 (dense) or a positive interval")
    need(moe.capacity_factor > 0 and moe.eval_capacity_factor > 0, "moe.capacity_factor", "> 0")
    need(moe.min_capacity >= 0, "moe.min_capacity", ">= 0")
    need(moe.d_expert >= 0, "moe.d_expert", "0 (= model.d_ff) or a positive width")
    need(moe.reroute_tries >= 1, "moe.reroute_tries", ">= 1")
    need(moe.bias_update_rate >= 0, "moe.bias_update_rate", ">= 0")
    need(moe.noise != "rsample" or (moe.score == "softmax" and moe.balance in ("aux", "none")), "moe.noise",
         "jitter or none with moe.score=sigmoid or a selection bias (rsample's Gumbel-max samples the softmax "
         "of the logits; the presets set rsample)")
    need(moe.routing == "token_choice" or moe.balance == "none", "moe.balance",
         "'none' with moe.routing=expert_choice (every expert takes exactly its capacity)")
    need(not moe.aux_loss_accumulate or moe.aux_loss_scope == "global_batch", "moe.aux_loss_accumulate",
         "false unless moe.aux_loss_scope=global_batch (only the global-batch loss accumulates)")
    need(moe.balance in ("aux", "both") or moe.aux_loss_scope == "micro_batch", "moe.aux_loss_scope",
         f"micro_batch with moe.balance={moe.balance} (no aux loss)")
    need(moe.exchange != "bounded" or moe.dropless, "moe.exchange",
         "ragged or padded unless moe.dropless=true (bounded is for dropless; with a capacity padded is exact "
         "and needs no host sync)")
    need(moe.bound_factor > 0, "moe.bound_factor", "> 0")
    need(moe.routing == "token_choice" or not moe.dropless, "moe.dropless",
         "false with moe.routing=expert_choice (each expert takes exactly its capacity)")


def _check_moe_impl(cfg: Config, need: _Need) -> None:
    """moe.impl=deepspeed: only what DeepSpeed's own MoE layer does."""
    moe = cfg.moe
    if moe.impl != "deepspeed":
        return
    need(moe.top_k <= 2, "moe.top_k", "1 or 2 with moe.impl=deepspeed (DeepSpeed's MoE layer gates top-1/top-2)")
    need(moe.noise in ("none", "jitter", "rsample"), "moe.noise", "none | jitter | rsample with moe.impl=deepspeed")
    for key, baseline in (("moe.overflow", "drop"), ("moe.routing", "token_choice"), ("moe.score", "softmax"),
                          ("moe.balance", "aux"), ("moe.aux_loss_scope", "micro_batch")):
        need(_get(cfg, key) == baseline, key, f"{baseline!r} with moe.impl=deepspeed (DeepSpeed's gating has only that)")
    need(moe.drop_policy == "position", "moe.drop_policy",
         "'position' with moe.impl=deepspeed (DeepSpeed's top-1/top-2 gating drops by position)")
    for key, baseline in (("moe.exchange", "ragged"), ("moe.a2a", "flat"), ("moe.a2a_chunks", 1)):
        need(_get(cfg, key) == baseline, key,
             f"{baseline!r} with moe.impl=deepspeed (DeepSpeed's MoE layer runs its own all-to-all)")


@dataclass
class MoBAConfig:
    block_size: int = _f(128, "keys per MoBA block (the gate scores each block by its mean key)")
    top_k: int = _f(3, "past blocks each query attends to, besides its own (causal) block")
    key_conv: int = _f(0, "causal depthwise convolution on the keys (FlashMoBA's kconv): 0 (off), 3 or 5 taps")
    full_attention_last_layers: int = _f(0, "the last N layers keep full attention (MoBA's hybrid recipe)")


def _check_moba(cfg: Config, need: _Need) -> None:
    if cfg.model.attention != "moba":
        return
    need(cfg.moba.block_size >= 16 and cfg.moba.block_size % 16 == 0, "moba.block_size",
         "a positive multiple of 16 (the kernels' tiles divide it)")
    need(cfg.moba.top_k >= 1, "moba.top_k", "a positive number of blocks")
    need(cfg.moba.key_conv in (0, 3, 5), "moba.key_conv", "0 (off), 3 or 5")
    need(0 <= cfg.moba.full_attention_last_layers <= cfg.model.num_layers, "moba.full_attention_last_layers",
         f"between 0 and model.num_layers={cfg.model.num_layers}")
    need(cfg.model.attention_window == 0, "model.attention_window", "0 with model.attention=moba")


@dataclass
class SourceConfig:
    path: str = _f("", "stdlib | site-packages | a file, folder or glob of text, .jsonl(.gz/.zst), Parquet, "
                       "or a Hugging Face save_to_disk folder")
    weight: float = _f(1.0, "sampling proportion (normalised over sources); 0 = held out, validation only")
    text_key: str = _f("text", "the field (.jsonl) or column (Parquet, Arrow) that holds the text")


@dataclass
class DataConfig:
    corpus: str = _f("stdlib", "the one source when data.sources is empty: stdlib (the interpreter's standard "
                                "library) | site-packages (every installed package's .py sources) | a path")
    sources: list[SourceConfig] = field(default_factory=list, metadata={
        "help": "sources to mix: a list of {path, weight, text_key} (docs/data.md); empty = data.corpus"})
    vocab_size: int = _f(4096, "sentencepiece BPE vocabulary size")
    seq_len: int = _f(128, "tokens per training sequence")
    val_fraction: float = _f(0.02, "fraction of each source's documents held out for validation")
    max_corpus_mb: float = _f(24.0, "read at most this many MB of files from each source (0 = all)")
    tokenizer_sample_mb: float = _f(8.0, "MB of text the tokenizer is trained on (a deterministic sample)")
    dedup: bool = _f(True, "drop exact duplicate documents (the first occurrence is kept)")
    shard_mb: float = _f(256.0, "target size of one token shard file in MB")
    ray_threshold_mb: float = _f(256.0, "sources smaller than this are prepared in-process, larger on Ray Data")
    cache_dir: str = _f("~/.cache/dist_moe", "tokenizers and token shards, keyed by file listing and settings")
    prefs: str = _f("", "dpo: preference pairs, a .jsonl of {prompt, chosen, rejected} rows")


def _check_data(cfg: Config, need: _Need) -> None:
    d = cfg.data
    need.positive("data.seq_len", "data.vocab_size")
    need(d.seq_len <= cfg.model.max_seq_len, "data.seq_len", f"<= model.max_seq_len={cfg.model.max_seq_len}")
    need(0 < d.val_fraction < 0.5, "data.val_fraction", "a fraction in (0, 0.5)")
    need(d.vocab_size >= 256, "data.vocab_size", ">= 256")
    need(d.shard_mb > 0, "data.shard_mb", "a positive size in MB")
    need(d.ray_threshold_mb >= 0, "data.ray_threshold_mb", ">= 0 (0 = always Ray Data)")
    for i, source in enumerate(d.sources):
        need(bool(source.path), "data.sources", f"a path in every source (source {i} has none)")
        need(source.weight >= 0, "data.sources", f"weights >= 0 (source {i}: {source.weight})")
    need(not d.sources or any(s.weight > 0 for s in d.sources), "data.sources", "at least one weight > 0")
    need(cfg.objective != "dpo" or bool(d.prefs), "data.prefs", "a .jsonl file of preference pairs with objective=dpo")


@dataclass
class TrainConfig:
    max_steps: int = _f(300, "optimizer steps")
    micro_batch_size: int = _f(16, "sequences per rank per micro step")
    grad_accum_steps: int = _f(1, "micro steps per optimizer step")
    lr: float = _f(3e-3, "peak learning rate")
    min_lr_ratio: float = _f(0.1, "cosine decays to lr * min_lr_ratio")
    warmup_steps: int = _f(20, "linear warmup steps")
    weight_decay: float = _f(0.1, "AdamW weight decay (not on norms or biases)")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.95, "AdamW beta2")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this (0 = off)")
    precision: str = _f("auto", "parameter precision", {"auto": "bf16 on GPU, fp32 on CPU", "fp32": "", "bf16": ""})
    grad_accum_dtype: str = _f("auto", "dtype micro-step gradients are summed in", {
        "auto": "fp32, except bf16 under ZeRO-0/1, where DeepSpeed cannot", "fp32": "", "bf16": ""})
    zero_stage: int = _f(0, "DeepSpeed ZeRO stage: 0, 1 or 2")
    seed: int = _f(1337, "seed for weights, data order and router noise")
    eval_every: int = _f(50, "evaluate on the val split every N steps (and at the end)")
    eval_batches: int = _f(8, "micro batches per evaluation")
    device: str = _f("auto", "where to train", {"auto": "", "cpu": "", "cuda": ""})


def _check_train(cfg: Config, need: _Need) -> None:
    t = cfg.train
    need.positive("train.max_steps", "train.micro_batch_size", "train.grad_accum_steps", "train.eval_batches")
    need(t.zero_stage in (0, 1, 2), "train.zero_stage", "0, 1 or 2")
    need(t.lr > 0, "train.lr", "a positive learning rate")
    need(0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio", "a ratio in [0, 1]")
    need(t.warmup_steps >= 0, "train.warmup_steps", ">= 0")
    need(t.grad_clip >= 0, "train.grad_clip", ">= 0 (0 = off)")


@dataclass
class DPOConfig:
    parent: str = _f("", "the run DPO starts from (set by `dist-moe dpo RUN_DIR`)")
    parent_checkpoint: str = _f("", "that run's checkpoint: the policy's start and the frozen reference")
    loss: str = _f("sigmoid", "preference loss", {"sigmoid": "DPO, Rafailov et al. 2023", "ipo": "Azar et al. 2023"})
    beta: float = _f(0.1, "how far the policy may move from the reference (IPO: its tau)")
    label_smoothing: float = _f(0.0, "sigmoid: probability a label is flipped (conservative DPO), in [0, 0.5)")
    val_fraction: float = _f(0.05, "fraction of preference pairs held out for evaluation")


def _check_dpo(cfg: Config, need: _Need) -> None:
    dpo = cfg.dpo
    if cfg.objective == "dpo":
        need(cfg.moe.exchange == "ragged" or cfg.moe.ep_size == 1, "moe.exchange",
             "ragged with objective=dpo and moe.ep_size > 1 (each rank pads its pairs to its own longest row, and "
             "the padded and bounded exchanges need every rank of the EP group to feed the same token count)")
        need(bool(dpo.parent and dpo.parent_checkpoint), "dpo.parent",
             "the run DPO starts from (start DPO with `dist-moe dpo RUN_DIR`)")
    need(dpo.beta > 0, "dpo.beta", "> 0")
    need(0 <= dpo.label_smoothing < 0.5, "dpo.label_smoothing", "a probability in [0, 0.5)")
    need(dpo.label_smoothing == 0 or dpo.loss == "sigmoid", "dpo.label_smoothing",
         "0 with dpo.loss=ipo (label smoothing is conservative DPO, a sigmoid-loss variant)")
    need(0 < dpo.val_fraction < 0.5, "dpo.val_fraction", "a fraction in (0, 0.5)")


@dataclass
class CheckpointConfig:
    every: int = _f(0, "save every N steps (0 = only at the end)")
    every_minutes: float = _f(0.0, "also save once this many minutes of wall clock passed since the last save "
                                   "(0 = off); bounds what a hard kill loses")
    keep: int = _f(3, "complete checkpoints kept in the run dir")


def _check_ckpt(cfg: Config, need: _Need) -> None:
    need(cfg.ckpt.keep >= 1, "ckpt.keep", ">= 1")
    need(cfg.ckpt.every >= 0, "ckpt.every", "0 (only at the end) or a positive interval")
    need(cfg.ckpt.every_minutes >= 0, "ckpt.every_minutes", "0 (off) or a positive number of minutes")


@dataclass
class LogConfig:
    every: int = _f(10, "print and log scalars every N steps")
    expert_every: int = _f(50, "log expert-load charts every N steps")
    tensorboard: bool = _f(True, "write TensorBoard event files to RUN_DIR/tb")


def _check_log(cfg: Config, need: _Need) -> None:
    need.positive("log.every", "log.expert_every")


@dataclass
class ClusterConfig:
    kind: str = _f("local", "launcher", {"local": "this process / --nproc", "ray": "Ray Train workers"})
    num_workers: int = _f(1, "workers (ranks) for cluster.kind=ray")
    use_gpu: bool = _f(False, "one GPU per Ray worker")
    address: str = _f("", "Ray cluster address; empty = start a local one on the fly")
    max_failures: int = _f(2, "Ray Train restarts after a worker dies")
    hang_timeout_s: float = _f(600.0, "a rank this long in one training phase (a step's collective, eval, a save) "
                                      "is a hang: the stopped ranks are named and the run exits or restarts")
    stop_timeout_s: int = _f(300, "seconds a stopped Ray run (SIGTERM/SIGINT, `dist-moe stop`) may take to "
                                  "save before it is killed; submit sets Ray's job stop timeout above it")
    min_workers: int = _f(0, "elastic: continue on as few as this many workers when nodes are lost (0 = off)")
    resize_check_s: float = _f(60.0, "elastic: seconds between Ray Train's checks for nodes that came back")


def _check_cluster(cfg: Config, need: _Need) -> None:
    c = cfg.cluster
    need.positive("cluster.num_workers")
    need(c.hang_timeout_s > 0, "cluster.hang_timeout_s", "a positive number of seconds")
    need(c.stop_timeout_s >= 1, "cluster.stop_timeout_s", "a positive number of seconds")
    need(0 <= c.min_workers <= c.num_workers, "cluster.min_workers", f"0 (off) to cluster.num_workers={c.num_workers}")
    global_micro_batch = cfg.train.micro_batch_size * c.num_workers
    need(all(global_micro_batch % n == 0 for n in range(c.min_workers or c.num_workers, c.num_workers + 1)),
         "cluster.min_workers", f"a worker count from which every count up to cluster.num_workers divides the "
                                f"global micro batch train.micro_batch_size * cluster.num_workers = {global_micro_batch}")
    need(c.resize_check_s > 0, "cluster.resize_check_s", "a positive interval")


@dataclass
class InitConfig:
    from_hf: str = _f("", "start from a transformers MoE folder (Mixtral, Qwen2-MoE, Qwen3-MoE): its shape, "
                          "weights, tokenizer")
    upcycle_from: str = _f("", "start from a dense transformers Llama or Qwen3 folder: every expert a copy of its "
                               "FFN (sparse upcycling; needs moe.top_k >= 2)")


def _check_init(cfg: Config, need: _Need) -> None:
    need(not (cfg.init.from_hf and cfg.init.upcycle_from), "init.upcycle_from", "empty when init.from_hf is set")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    moba: MoBAConfig = field(default_factory=MoBAConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    ckpt: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    init: InitConfig = field(default_factory=InitConfig)
    run_dir: str = _f("", "where this run writes everything; empty = runs/<timestamp>")
    resume: str = _f("never", "continue a run",
                     {"never": "", "auto": "continue from run_dir's latest checkpoint if there is one"})
    objective: str = _f("lm", "what to optimise",
                        {"lm": "next-token pretraining", "dpo": "preference tuning; set by `dist-moe dpo`"})




def resolve_preset(name_or_path: str) -> Path:
    """A preset is a YAML path, or the name of one shipped in configs/ ('tiny', 'small', ...)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    shipped = _preset_dir() / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    names = ", ".join(sorted(p.stem for p in _preset_dir().glob("*.yaml")))
    raise ConfigError(f"preset '{name_or_path}': no such file, and not a shipped preset ({names})")


def _error_key(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None) or ""
    return str(key)


# Keys renamed to transformers' names: an override of an old name is told the new one; a config.yaml written
# before the rename (a run dir's) is read with the new names, unless it used YaRN, whose formula changed.
RENAMED = {"model.rope_original_max_seq_len": "model.rope_original_max_position_embeddings",
           "model.yarn_beta_fast": "model.rope_beta_fast", "model.yarn_beta_slow": "model.rope_beta_slow"}


def _migrate(layer: DictConfig, source: str) -> DictConfig:
    model = layer.get("model") if isinstance(layer, DictConfig) else None
    old = [key.split(".")[1] for key in RENAMED if model is not None and key.split(".")[1] in model]
    if not old:
        return layer
    if model.get("rope_scaling") == "yarn":
        raise ConfigError(f"{source}: trained with dist_moe's earlier YaRN, which ramps frequencies linearly in "
                          "rotations (transformers ramps in dimension index: up to 67% apart), so its weights do "
                          "not fit the current model; resume or sample it with the dist_moe version that trained it")
    for name in old:
        model[RENAMED[f"model.{name}"].split(".")[1]] = model.pop(name)
    return layer


def load_config(preset: Optional[str] = None, overrides: tuple[str, ...] | list[str] = ()) -> Config:
    """Defaults <- preset YAML <- `key=value` overrides, then validated. Returns a plain Config."""
    cfg = OmegaConf.structured(Config)
    layers = []
    if preset:
        path = resolve_preset(preset)
        try:
            layer = OmegaConf.load(path)
        except Exception as exc:
            raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
        layers.append(_migrate(layer, str(path)))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected key=value, e.g. train.max_steps=100")
        if item.split("=", 1)[0] in RENAMED:
            key = item.split("=", 1)[0]
            raise ConfigError(f"config key '{key}' is now '{RENAMED[key]}' (transformers' name for it)")
    try:
        layers.append(OmegaConf.from_dotlist([_expand_shorthand(o) for o in overrides]))
        for layer in layers:
            cfg = OmegaConf.merge(cfg, layer)
    except OmegaConfBaseException as exc:
        raise ConfigError(_describe(exc)) from None
    obj: Config = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    validate(obj)
    return obj


def _expand_shorthand(item: str) -> str:
    """`cluster=ray` is shorthand for `cluster.kind=ray`."""
    key, value = item.split("=", 1)
    return f"cluster.kind={value}" if key == "cluster" else item


def _describe(exc: OmegaConfBaseException) -> str:
    key = _error_key(exc)
    message = str(exc).splitlines()[0]
    if "not in struct" in message or "Key '" in message and "not in" in message:
        section = key.rsplit(".", 1)[0] if "." in key else ""
        known = _known_keys(section)
        return f"unknown config key '{key}' (known{' in ' + section if section else ''}: {', '.join(known)})"
    if "Value '" in message or "could not be converted" in message.lower() or "Invalid type" in message:
        expected = _field_type(key)
        return f"config key '{key}': {message}" + (f" (expected {expected})" if expected else "")
    return f"config key '{key}': {message}" if key else message


def _section_class(section: str):
    cls = Config
    for part in filter(None, section.split(".")):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if part not in fields or not dataclasses.is_dataclass(fields[part].default_factory):  # type: ignore
            return None
        cls = fields[part].default_factory  # type: ignore[assignment]
    return cls


def _known_keys(section: str) -> list[str]:
    cls = _section_class(section)
    return [f.name for f in dataclasses.fields(cls)] if cls else []


def _field_type(key: str) -> str:
    section, _, name = key.rpartition(".")
    cls = _section_class(section)
    if cls is None:
        return ""
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    return ""


class _Need:
    """need(ok, key, expected): a ConfigError naming `key`, its value and what was expected, unless ok."""

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def __call__(self, ok: bool, key: str, expected: str) -> None:
        if not ok:
            raise ConfigError(f"config key '{key}' = {_get(self.cfg, key)!r}: expected {expected}")

    def positive(self, *keys: str) -> None:
        for key in keys:
            self(_get(self.cfg, key) >= 1, key, "a positive integer")


def validate(cfg: Config) -> None:
    """Impossible combinations, each reported as one line naming the key: the allowed values of every key
    with choices, then each section's checks (beside its dataclass above)."""
    need = _Need(cfg)
    for key, allowed in _choice_keys():
        need(_get(cfg, key) in allowed, key, "one of " + " | ".join(allowed))
    for check in (_check_model, _check_moe, _check_moe_impl, _check_moba, _check_data, _check_train, _check_ckpt,
                  _check_log, _check_cluster, _check_dpo, _check_init):
        check(cfg, need)


def _choice_keys(cls: Optional[type] = None, prefix: str = "") -> list[tuple[str, tuple[str, ...]]]:
    """(dotted key, allowed values) of every field declared with choices."""
    keys = []
    for f in dataclasses.fields(cls or Config):
        if dataclasses.is_dataclass(f.default_factory):  # type: ignore[arg-type]
            keys += _choice_keys(f.default_factory, f"{prefix}{f.name}.")  # type: ignore[arg-type]
        elif f.metadata.get("choices"):
            keys.append((prefix + f.name, f.metadata["choices"]))
    return keys


def fit_to_workers(cfg: Config, num_workers: int) -> Config:
    """The config an elastic Ray run trains with on `num_workers` of its cluster.num_workers: the micro batch
    grows so the global batch (and every step's data) stays the same, and the EP size shrinks to the largest
    divisor of both moe.ep_size and the worker count. validate() guarantees the division is exact."""
    if num_workers == cfg.cluster.num_workers:
        return cfg
    micro_batch = cfg.train.micro_batch_size * cfg.cluster.num_workers // num_workers
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, micro_batch_size=micro_batch),
                               moe=dataclasses.replace(cfg.moe, ep_size=math.gcd(cfg.moe.ep_size, num_workers)))


def check_world_size(cfg: Config, world_size: int) -> None:
    """Checks that need the number of ranks, made once it is known (at launch)."""
    ep = cfg.moe.ep_size
    if world_size % ep != 0:
        how = f"cluster.num_workers={ep}" if cfg.cluster.kind == "ray" else f"dist-moe train --nproc {ep}"
        raise ConfigError(f"config key 'moe.ep_size' = {ep}: expected a divisor of the world size {world_size} "
                          f"(run on {ep} ranks or a multiple: {how})")


# Keys a checkpoint was built with: changing them on resume would not load or would silently change the run.
UNRESUMABLE = ("model.", "moba.", "moe.num_experts", "moe.d_expert", "moe.moe_every", "moe.shared_expert", "moe.impl",
               "moe.noise", "moe.balance", "data.corpus", "data.sources", "data.vocab_size", "data.seq_len",
               "data.val_fraction", "data.max_corpus_mb", "data.tokenizer_sample_mb", "data.dedup", "data.shard_mb",
               "train.seed")


# Keys that shape the weights: a run that starts from another run's checkpoint (DPO) must keep them.
WEIGHT_SHAPING = ("model.", "moe.num_experts", "moe.d_expert", "moe.moe_every", "moe.shared_expert", "moe.impl")


def check_resumable(saved: Config, new: Config, keys: tuple[str, ...] = UNRESUMABLE,
                    why: str = "it cannot change on resume") -> None:
    """The first key (of those starting with one of `keys`) that differs between a run's saved config and
    the one continuing from its checkpoint."""
    old_flat, new_flat = _flatten(OmegaConf.structured(saved)), _flatten(OmegaConf.structured(new))
    for key, value in new_flat.items():
        if key.startswith(keys) and old_flat.get(key) != value:
            raise ConfigError(f"config key '{key}' = {value!r} differs from the checkpointed run's "
                              f"{old_flat.get(key)!r}; {why}")


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in node.items():
        if isinstance(value, DictConfig):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _get(cfg: Config, key: str) -> Any:
    obj: Any = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def from_yaml(text: str, source: str = "<config>") -> Config:
    """Re-read a resolved config (as written into a run dir): no preset layering, still validated."""
    try:
        loaded = OmegaConf.merge(OmegaConf.structured(Config), _migrate(OmegaConf.create(text), source))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{source}: {_describe(exc)}") from None
    obj: Config = OmegaConf.to_object(loaded)  # type: ignore[assignment]
    validate(obj)
    return obj


def from_yaml_file(path: Path) -> Config:
    return from_yaml(Path(path).read_text(), str(path))


def help_text(preset: str) -> str:
    """Every key with its value under `preset` (what a run without overrides gets) and its meaning."""
    cfg = load_config(preset)
    lines = []
    for section in dataclasses.fields(Config):
        if dataclasses.is_dataclass(section.default_factory):  # type: ignore[arg-type]
            lines.append(f"  {section.name}:")
            values = getattr(cfg, section.name)
            for f in dataclasses.fields(section.default_factory):  # type: ignore[arg-type]
                value = _fmt(getattr(values, f.name))
                lines.append(f"    {section.name + '.' + f.name:<32} {value:<12} {f.metadata['help']}")
        else:
            value = _fmt(getattr(cfg, section.name))
            lines.append(f"  {section.name:<34} {value:<12} {section.metadata['help']}")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


# ----------------------------------------------------------------------------------------------------
# Derived values shared by the model, the trainer and DeepSpeed


def head_dim(m: ModelConfig) -> int:
    return m.head_dim or m.d_model // m.num_heads


def expert_width(cfg: Config) -> int:
    return cfg.moe.d_expert or cfg.model.d_ff


def is_moba_layer(cfg: Config, layer_index: int) -> bool:
    return cfg.model.attention == "moba" and layer_index < cfg.model.num_layers - cfg.moba.full_attention_last_layers


def is_moe_layer(cfg: Config, layer_index: int) -> bool:
    every = cfg.moe.moe_every
    return every > 0 and (layer_index + 1) % every == 0


def use_bf16(cfg: Config, device_type: str) -> bool:
    return cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device_type == "cuda")


def grad_accum_dtype(cfg: Config, device_type: str) -> str:
    """fp32 or bf16: what gradients are summed in across micro steps.

    With bf16 parameters DeepSpeed sums them in fp32 only under ZeRO-2 (ZeRO-1 would switch to its
    BF16_Optimizer, whose checkpoints differ; ZeRO-0 refuses), so auto means fp32 wherever that is possible.
    """
    choice, bf16, stage = cfg.train.grad_accum_dtype, use_bf16(cfg, device_type), cfg.train.zero_stage
    if choice == "fp32" and bf16 and stage != 2:
        raise ConfigError(f"config key 'train.grad_accum_dtype' = 'fp32': expected auto or bf16 with bf16 "
                          f"parameters under train.zero_stage={stage} (DeepSpeed sums in fp32 only under ZeRO-2)")
    if choice == "bf16" and not bf16:
        raise ConfigError("config key 'train.grad_accum_dtype' = 'bf16': expected auto or fp32 with fp32 "
                          "parameters (train.precision)")
    if choice == "auto":
        return "bf16" if bf16 and stage != 2 else "fp32"
    return choice
