"""The experts' grouped GEMMs, each run on the backend `choose_backend` picks (MegaBlocks' ops-layer choice).

Backends, fastest first where they apply: on Hopper our TMA grouped GEMMs (grouped_gemm.py; the
warp-specialised Gluon kernel of grouped_gemm_gluon.py on Triton 3.6), then `torch._grouped_mm` (CUDA,
bf16, 8-aligned), else a loop of per-expert matmuls. For the weight gradient neither the Gluon kernel nor
torch._grouped_mm wins everywhere, so the first backward times both once per shape and the verdict is kept.
All share one contract: row segment i of x (R, K) belongs to expert i; segment sizes tokens_per_expert (G,)
sum to N <= R; rows past N are not read (and not written on CUDA: callers must not read them).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import grouped_gemm

Tiles = tuple[torch.Tensor, torch.Tensor]  # expert_tiles(tokens_per_expert): (segment ends, tile ends)

_GLUON_WEIGHT_GRAD_FASTER: dict[tuple, bool] = {}  # shape -> measured verdict, see choose_backend


def expert_tiles(rows: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, tokens_per_expert: torch.Tensor):
    """Our TMA grouped GEMMs' tile map where they apply to this expert MLP (built once per step), else None."""
    if grouped_gemm.tma_applies(rows, w13, w2):
        return grouped_gemm.expert_tiles(tokens_per_expert)
    return None


def _torch_applies(x: torch.Tensor, w: torch.Tensor) -> bool:
    aligned = x.shape[-1] % 8 == 0 and w.shape[-1] % 8 == 0
    return x.is_cuda and x.dtype == w.dtype == torch.bfloat16 and aligned and hasattr(torch, "_grouped_mm")


def _cuda_ms(fn, reps: int = 3) -> float:
    fn()  # compiles on first use
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def choose_backend(x: torch.Tensor, w: torch.Tensor, tiles: Optional[Tiles], weight_grad: bool = False) -> str:
    """'gluon' | 'triton' | 'torch' | 'loop' for the product of x's segments with w (weight_grad: x_i^T w_i).

    The weight gradient's Gluon-or-torch verdict is timed once per shape with CUDA events (the first backward
    syncs for it) and remembered: neither wins everywhere (bench/results/moe_notes.md).
    """
    if tiles is not None and not weight_grad:
        return "gluon" if grouped_gemm.GLUON else "triton"
    if tiles is not None and grouped_gemm.GLUON:
        key = (x.shape, w.shape, tiles[0].numel(), x.dtype)
        if key not in _GLUON_WEIGHT_GRAD_FASTER:
            gluon_ms = _cuda_ms(lambda: grouped_gemm.grouped_mm_weight_grad_gluon(x, w, tiles[0]))
            torch_ms = _cuda_ms(lambda: torch._grouped_mm(x.t(), w, offs=tiles[0])) if _torch_applies(x, w) else 1e9
            _GLUON_WEIGHT_GRAD_FASTER[key] = gluon_ms <= torch_ms
        if _GLUON_WEIGHT_GRAD_FASTER[key]:
            return "gluon"
    return "torch" if _torch_applies(x, w) else "loop"


def _offsets(tokens_per_expert: torch.Tensor, tiles: Optional[Tiles]) -> torch.Tensor:
    """torch._grouped_mm's segment ends: the tile map's first half when there is one."""
    return tiles[0] if tiles is not None else torch.cumsum(tokens_per_expert, 0, dtype=torch.int32)


def grouped_mm(x: torch.Tensor, w: torch.Tensor, tokens_per_expert: torch.Tensor,
               tiles: Optional[Tiles] = None) -> torch.Tensor:
    """Row segment i of x (R, K) times w[i] (K, M) -> (R, M) (rows past N zero on the loop path).
    tiles = expert_tiles(...) where our TMA grouped GEMMs apply (both tile by 128 rows, so they share the map)."""
    backend = choose_backend(x, w, tiles)
    if backend == "gluon":
        return grouped_gemm.grouped_mm_gluon(x, w, tiles)
    if backend == "triton":
        return grouped_gemm.grouped_mm(x, w, tiles)
    if backend == "torch":
        return torch._grouped_mm(x, w, offs=_offsets(tokens_per_expert, tiles))
    sizes = tokens_per_expert.tolist()
    out = [segment @ w[i] for i, segment in enumerate(x[:sum(sizes)].split(sizes))]
    return torch.cat(out + [x.new_zeros(x.shape[0] - sum(sizes), w.shape[2])])


def grouped_mm_weight_grad(x: torch.Tensor, grad: torch.Tensor, tokens_per_expert: torch.Tensor,
                           tiles: Optional[Tiles] = None) -> torch.Tensor:
    """Per expert i: x_i^T grad_i over its row segment -> (G, K, M) for x (R, K), grad (R, M); empty segments
    give zeros. The weight gradient of grouped_mm."""
    backend = choose_backend(x, grad, tiles, weight_grad=True)
    if backend == "gluon":
        return grouped_gemm.grouped_mm_weight_grad_gluon(x, grad, tiles[0])
    if backend == "torch":
        return torch._grouped_mm(x.t(), grad, offs=_offsets(tokens_per_expert, tiles))
    sizes = tokens_per_expert.tolist()
    pairs = zip(x[:sum(sizes)].split(sizes), grad[:sum(sizes)].split(sizes))
    return torch.stack([a.t() @ b for a, b in pairs])
