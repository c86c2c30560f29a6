"""Kernels launched per MoE layer step by the router, routing plan, losses and stats: PyTorch path vs fused.

Counts, for one forward+backward of exactly that part (router GEMM, gating, aux and z losses, the plan of
`route`, MoEStats; gradients flow in through the combine weights and both losses), the aten ops dispatched
(TorchDispatchMode; views and allocations launch nothing and are left out) and the Triton launches. The
count depends on neither T, d nor the device, so it runs on CPU: Triton under TRITON_INTERPRET=1, the bf16
router GEMM (CUDA only) on the meta device, where it dispatches the same aten ops as on CUDA.
    python bench/moe_router_ops.py
"""
import os
import sys
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # before triton loads
os.environ.setdefault("DS_ACCELERATOR", "cpu")
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dist_moe.kernels import moe_router  # noqa: E402
from dist_moe.model.moe.dispatch import expert_capacity, route  # noqa: E402
from dist_moe.model.moe.layer import MoEStats  # noqa: E402
from dist_moe.model.moe.router import top_k_gating  # noqa: E402

SHAPES = {"a": dict(E=8, k=2), "b": dict(E=64, k=8)}
ALLOCATIONS = {"empty", "empty_strided", "empty_like"}


class OpCounter(TorchDispatchMode):
    """Counts the aten ops that launch work: not views (outputs aliasing an input), not bare allocations."""

    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        returns = func._schema.returns
        view = bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)
        if not view and func.overloadpacket.__name__ not in ALLOCATIONS:
            self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def triton_launches(counter: Counter):
    """Counts launches of kernels/moe_router.py's kernels; what the launcher itself does is not counted."""
    kind = type(moe_router._router_forward_kernel)
    run = kind.run

    def counted(self, *args, **kwargs):
        counter[f"triton:{self.fn.__name__}"] += 1
        with _disable_current_modes():
            return run(self, *args, **kwargs)

    kind.run = counted
    try:
        yield
    finally:
        kind.run = run


def step(x, w, k, capacity, fused: bool) -> Counter:
    T, E = x.shape[0], w.shape[0]
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(T, k, generator=gen), torch.ones(()), torch.ones(())]
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    x_meta, w_meta = (torch.empty_like(t, device="meta").requires_grad_() for t in (x, w))
    logits = torch.randn(T, E).requires_grad_()  # the fused part's input (the GEMM runs on meta)
    counter = OpCounter()
    with counter, triton_launches(counter.ops):
        if not fused:  # what CUDA ran before: fp32 copies and GEMM, then the PyTorch gating and plan
            weights, indices, aux, z, stats = top_k_gating(torch.nn.functional.linear(x.float(), w.float()), k)
            plan = route(indices, weights, E, capacity)  # on CPU: the PyTorch code
            outputs = (plan.combine_weights, plan.tokens_per_expert, plan.dropped)
        else:  # what CUDA runs now: the bf16 GEMM (on meta here), then the Triton kernels
            gemm = moe_router._BF16RouterLogits.apply(x_meta, w_meta)
            weights, indices, aux, z, stats = moe_router.fused_router(logits, k)
            _, _, combine, tokens_per_expert, _, dropped = moe_router.fused_route(indices, weights, E, capacity)
            outputs = (combine, tokens_per_expert, dropped)
        MoEStats.of(stats, outputs[1], outputs[2], capacity or T, T, T * k)
        torch.autograd.backward([outputs[0], aux, z], grads)
        if fused:
            gemm.backward(torch.empty_like(gemm))
    return counter.ops


def main():
    T, D = 512, 64
    for name, s in SHAPES.items():
        for label, factor in (("dropless", None), ("cf 1.25", 1.25)):
            capacity = None if factor is None else expert_capacity(T, s["E"], s["k"], factor, 4)
            x = torch.randn(T, D, dtype=torch.bfloat16)
            w = torch.randn(s["E"], D, dtype=torch.bfloat16) * 0.1
            before, after = step(x, w, s["k"], capacity, False), step(x, w, s["k"], capacity, True)
            print(f"({name}) E={s['E']} k={s['k']} {label}: torch path {sum(before.values())} kernels, "
                  f"fused {sum(after.values())}")
            print(f"  torch: {dict(before.most_common())}")
            print(f"  fused: {dict(after.most_common())}")


if __name__ == "__main__":
    main()
