"""Start from a transformers checkpoint folder: import (`init.from_hf`, `dist-moe generate --from-hf`) and
dense-to-MoE sparse upcycling (`init.upcycle_from`, Komatsuzaki et al. 2022).

Import takes the model's shape from its config.json (adapter.apply_hf_config) and its weights from the
safetensors files, each rank loading only its own experts. Upcycling takes a dense Llama or Qwen3:
attention (with Qwen3's q/k norms), norms, embeddings and the dense layers as they are, and in every MoE
layer each expert a copy of the dense FFN with the router kept at its small random init. With identical
experts and top-k weights renormalised to sum to 1, the MoE layer outputs the dense FFN for any router,
so the model starts at the dense model's loss (dropless: a dropped token would lose its FFN output). The
tokenizer comes with the folder: training needs its sentencepiece `tokenizer.model` (dist-moe export
writes one); generation uses transformers' tokenizer.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import torch

from dist_moe.config import Config, ConfigError, validate
from dist_moe.hf import adapter
from dist_moe.model.moe.experts import stack_w13


class FolderEntries(dict):
    """A folder's config.json keys or weights: one the folder lacks is a one-line error naming it."""

    def __init__(self, entries: dict, missing: str):
        super().__init__(entries)
        self.missing = missing  # the error, with {} for the key

    def __missing__(self, key: str):
        raise ConfigError(self.missing.format(key))


def read_config(path: str | Path) -> FolderEntries:
    file = Path(path) / "config.json"
    if not file.is_file():
        raise ConfigError(f"'{path}': no config.json (expected a transformers checkpoint folder)")
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"'{file}': not JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"'{file}': expected a JSON object of config keys")
    return FolderEntries(config, f"'{file}': no key '{{}}' (expected in a {config.get('model_type')} config)")


def read_weights(path: str | Path) -> FolderEntries:
    """Every tensor of the folder's safetensors files (one file or transformers' shards), on the CPU."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise ConfigError(f"'{path}': no .safetensors files")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            state.update(load_file(str(file)))
        except (SafetensorError, OSError) as exc:
            raise ConfigError(f"'{file}': not a readable safetensors file ({exc})") from None
    return FolderEntries(state, f"'{path}': no weight '{{}}' in its safetensors files (expected transformers' "
                                "names: per-expert or fused expert tensors)")


def _source(cfg: Config) -> tuple[str, bool]:
    """(folder, dense) of the configured init."""
    return (cfg.init.upcycle_from, True) if cfg.init.upcycle_from else (cfg.init.from_hf, False)


def apply_init_config(cfg: Config) -> Config:
    """A copy of cfg with the model's shape from the init folder's config.json (and its weights' shared expert)."""
    cfg = with_init_shape(cfg)
    validate(cfg)
    return cfg


def with_init_shape(cfg: Config) -> Config:
    """apply_init_config without validating the result."""
    cfg = copy.deepcopy(cfg)
    path, dense = _source(cfg)
    if cfg.moe.impl != "dist_moe":
        raise ConfigError(f"config key 'moe.impl' = {cfg.moe.impl!r}: expected 'dist_moe' with init.from_hf / "
                          "init.upcycle_from")
    adapter.apply_hf_config(read_config(path), cfg, path, dense=dense)
    if dense:
        cfg.moe.d_expert = cfg.model.d_ff  # every expert is a copy of the dense FFN
        if cfg.moe.shared_expert or cfg.moe.top_k < 2 or not cfg.moe.normalize_weights:
            raise ConfigError("config key 'moe.top_k' / 'moe.normalize_weights' / 'moe.shared_expert': upcycling "
                              "needs top_k >= 2 with normalize_weights=true and no shared expert, so that the MoE "
                              "starts equal to the dense model")
    elif read_config(path)["model_type"] == "qwen2_moe":
        cfg.moe.shared_expert = adapter.qwen2_shared_expert(read_weights(path), cfg, path)
    return cfg


def init_tokenizer(cfg: Config) -> Path | None:
    """The init folder's sentencepiece model, which training then uses instead of training one."""
    path, _ = _source(cfg)
    model = Path(path) / "tokenizer.model"
    return model if path and model.is_file() else None


def load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a whole model's state dict (every expert) into `model`, each MoE layer taking its own experts."""
    state = dict(state)
    for i, block in enumerate(model.blocks):
        if block.is_moe:
            experts = block.ffn.experts
            local = slice(experts.first_expert, experts.first_expert + experts.w13.shape[0])
            for w in ("w13", "w2"):
                state[f"blocks.{i}.ffn.experts.{w}"] = state[f"blocks.{i}.ffn.experts.{w}"][local]
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("noise_weight") for k in missing), (missing, unexpected)


def own_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors under its module names (its state_dict may be under DeepSpeed's, once the engine's
    key hooks are on)."""
    return {**dict(model.named_buffers()), **dict(model.named_parameters())}


def upcycled_state(hf_state: dict[str, torch.Tensor], cfg: Config, model: torch.nn.Module) -> dict:
    """The MoE's state dict: the dense model's, its FFN copied into every expert, routers as the model
    initialised them."""
    dense_cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, moe_every=0))
    state = adapter.from_hf(hf_state, dense_cfg, "dense", "")
    own = own_weights(model)
    for i in range(cfg.model.num_layers):
        if not model.blocks[i].is_moe:
            continue
        w1, w2, w3 = (state.pop(f"blocks.{i}.ffn.{w}.weight").t() for w in ("w1", "w2", "w3"))  # (in, out)
        experts = cfg.moe.num_experts
        state[f"blocks.{i}.ffn.router.weight"] = own[f"blocks.{i}.ffn.router.weight"]
        state[f"blocks.{i}.ffn.experts.w13"] = stack_w13(w1, w3).expand(experts, -1, -1)
        state[f"blocks.{i}.ffn.experts.w2"] = w2.expand(experts, -1, -1)
    return state


def load_init_weights(model: torch.nn.Module, cfg: Config) -> None:
    """Weights from init.from_hf or init.upcycle_from into a freshly built model (cfg from apply_init_config)."""
    path, dense = _source(cfg)
    hf_state = read_weights(path)
    if dense:
        state = upcycled_state(hf_state, cfg, model)
    else:
        state = adapter.from_hf(hf_state, cfg, read_config(path)["model_type"], path)
    _check_shapes(state, model, path)
    load_model_state(model, state)


def _check_shapes(state: dict[str, torch.Tensor], model: torch.nn.Module, path: str) -> None:
    """Every weight of the folder as large as its config.json makes ours (a rank holds only its own experts:
    stacked experts compare one expert's shape)."""
    expected = own_weights(model)
    for key, value in state.items():
        ours = expected.get(key)
        if ours is None:
            continue
        stacked = key.endswith(("experts.w13", "experts.w2"))
        got, want = (value.shape[1:], ours.shape[1:]) if stacked else (value.shape, ours.shape)
        if got != want:
            raise ConfigError(f"'{path}': the weight that becomes our {key} has shape {tuple(got)}, but its "
                              f"config.json makes it {tuple(want)}")


def generate_from_hf(path: str | Path, prompt: str, max_new_tokens: int, temperature: float, top_k: int,
                     seed: int) -> str:
    """`dist-moe generate --from-hf PATH`: our model with the folder's weights and transformers' tokenizer."""
    from dist_moe.config import load_config
    from dist_moe.hf import require_transformers
    from dist_moe.model.transformer import Transformer, generate

    transformers = require_transformers()
    cfg = with_init_shape(load_config(None, [f"init.from_hf={path}", "moe.dropless=true"]))
    # nothing trains: the training keys' defaults (data.seq_len = 128) must not refuse a model of fewer positions
    validate(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, seq_len=cfg.model.max_seq_len)))
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
    model = Transformer(cfg)
    load_init_weights(model, cfg)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    if ids.shape[1] == 0:
        ids = torch.tensor([[tokenizer.eos_token_id]])
    room = cfg.model.max_seq_len - ids.shape[1]
    out = generate(model, ids, min(max_new_tokens, room), temperature, top_k,
                   generator=torch.Generator().manual_seed(seed))
    return tokenizer.decode(out[0])
