"""The decoder-only MoE transformer, top to bottom in the order a token meets it: tokens -> embedding ->
Block x L (RMSNorm -> GQA attention with RoPE; RMSNorm -> MoE or dense SwiGLU FFN) -> RMSNorm -> LM head (tied
with the embedding by default). Plain PyTorch: MoE layers take this rank's expert-parallel group (None in one
process); what DeepSpeed's engine or the bounded exchange need is applied from outside (train/).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dist_moe.config import Config, ConfigError, expert_width, is_moba_layer, is_moe_layer
from dist_moe.model.attention import GroupedQueryAttention, KVCache
from dist_moe.model.moe.experts import SwiGLU
from dist_moe.model.moe.layer import MoELayer
from dist_moe.model.norm import RMSNorm
from dist_moe.model.rope import rope_cache


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, T, V)
    aux_loss: torch.Tensor  # () load-balancing loss summed over MoE layers (unweighted)
    z_loss: torch.Tensor  # () router z-loss summed over MoE layers (unweighted)


class Block(nn.Module):
    def __init__(self, cfg: Config, layer_index: int, ep_group):
        super().__init__()
        m = cfg.model
        self.attn_norm = RMSNorm(m.d_model, m.norm_eps)
        self.attn = GroupedQueryAttention(m, cfg.moba if is_moba_layer(cfg, layer_index) else None)
        self.ffn_norm = RMSNorm(m.d_model, m.norm_eps)
        self.is_moe = is_moe_layer(cfg, layer_index)
        self.ffn = MoELayer(cfg, ep_group) if self.is_moe else SwiGLU(m.d_model, m.d_ff)

    def forward(self, x, cos, sin, cache: KVCache | None = None):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache)
        if not self.is_moe:
            return x + self.ffn(self.ffn_norm(x)), None, None
        y, aux_loss, z_loss = self.ffn(self.ffn_norm(x))
        return x + y, aux_loss, z_loss


class Transformer(nn.Module):
    def __init__(self, cfg: Config, ep_group=None):
        super().__init__()
        m = cfg.model
        if m.vocab_size <= 0:
            raise ValueError("model.vocab_size must be set (the trainer takes it from the tokenizer)")
        self.cfg = cfg
        self.embed = nn.Embedding(m.vocab_size, m.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i, ep_group) for i in range(m.num_layers))
        self.norm = RMSNorm(m.d_model, m.norm_eps)
        self.lm_head = nn.Linear(m.d_model, m.vocab_size, bias=False)
        if m.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = rope_cache(m, m.max_seq_len)
        self.register_buffer("rope_cos", cos, persistent=False)  # (max_seq_len, head_dim)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std) everywhere outside MoE layers (they initialise themselves, identically on
        every EP size); output projections scaled by 1/sqrt(2L) as in GPT-2."""
        std = self.cfg.model.init_std
        self.embed.weight.normal_(0.0, std)
        if not self.cfg.model.tie_embeddings:
            self.lm_head.weight.normal_(0.0, std)
        out_std = std / math.sqrt(2 * self.cfg.model.num_layers)
        for block in self.blocks:
            dense = [block.attn] + ([] if block.is_moe else [block.ffn])
            for module in dense:
                for name, linear in module.named_children():
                    if isinstance(linear, nn.Linear):  # MoBA's key convolution keeps its identity init
                        linear.weight.normal_(0.0, out_std if name in ("wo", "w2") else std)

    def forward(self, tokens: torch.Tensor, caches: list[KVCache] | None = None) -> ModelOutput:
        """tokens (B, T) int64 -> logits (B, T, V) and the summed router losses (unweighted)."""
        offset = caches[0].length if caches else 0
        if offset + tokens.shape[1] > self.rope_cos.shape[0]:
            raise ValueError(f"sequence of {offset + tokens.shape[1]} tokens > model.max_seq_len={self.rope_cos.shape[0]}")
        x = self.embed(tokens)  # (B, T, D)
        aux_loss = z_loss = torch.zeros((), device=tokens.device)
        for i, block in enumerate(self.blocks):
            x, aux, z = block(x, self.rope_cos, self.rope_sin, caches[i] if caches else None)
            if aux is not None:
                aux_loss, z_loss = aux_loss + aux, z_loss + z
        return ModelOutput(self.lm_head(self.norm(x)), aux_loss, z_loss)


def num_parameters(model: Transformer) -> tuple[int, int]:
    """(total, active per token). Expert weights are counted from the config, since under expert parallelism
    a rank holds only its own experts: total counts all experts, active only top_k of them per MoE layer.
    The tied embedding is counted once (as the LM head matmul it also is)."""
    cfg = model.cfg
    per_expert = 3 * cfg.model.d_model * expert_width(cfg)
    local_experts = sum(block.ffn.num_local_experts for block in model.blocks if block.is_moe)
    dense = sum(p.numel() for p in model.parameters()) - local_experts * per_expert
    moe_layers = sum(block.is_moe for block in model.blocks)
    return (dense + moe_layers * cfg.moe.num_experts * per_expert,
            dense + moe_layers * cfg.moe.top_k * per_expert)


@torch.no_grad()
def generate(model: Transformer, tokens: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int = 0, generator: torch.Generator | None = None,
             first_allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Sample max_new_tokens after tokens (B, T) with a KV cache; temperature 0 = greedy. The first token is
    drawn from `first_allowed` (token ids) when given: token healing (Tokenizer.heal_prompt). Refuses a model
    with expert-choice routing: an expert picks among all tokens at once, so a token's route depends on later
    ones."""
    if model.cfg.moe.routing == "expert_choice" and model.cfg.moe.moe_every > 0:
        raise ConfigError("config key 'moe.routing' = 'expert_choice' is not causal (each expert picks among "
                          "the whole batch, later tokens included): token-by-token generation is refused")
    model.eval()
    caches = [KVCache() for _ in model.blocks]
    logits = model(tokens, caches).logits[:, -1]  # (B, V)
    if first_allowed is not None and len(first_allowed):
        barred = torch.ones(logits.shape[-1], dtype=torch.bool, device=logits.device)
        barred[first_allowed] = False
        logits = logits.masked_fill(barred, float("-inf"))
    out = [tokens]
    for _ in range(max_new_tokens):
        if temperature == 0:
            next_token = logits.argmax(-1, keepdim=True)
        else:
            logits = logits.float() / temperature
            if top_k > 0:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            next_token = torch.multinomial(F.softmax(logits, -1), 1, generator=generator)  # (B, 1)
        out.append(next_token)
        logits = model(next_token, caches).logits[:, -1]
    return torch.cat(out, dim=1)
