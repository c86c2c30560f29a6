"""Scratch: the code before a change, as monkeypatches, to measure a change in one call. Not committed."""
import os, sys
import torch
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import deepspeed  # noqa: before AdamW is replaced (it subclasses it)
v = os.environ.get("V", "")
if "old" in v:
    class UnfusedAdamW(torch.optim.AdamW):
        def __init__(self, *a, fused=None, **kw):
            super().__init__(*a, **kw)
    torch.optim.AdamW = UnfusedAdamW
    from dist_moe.model import transformer

    def old_norm(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight
    transformer.RMSNorm.forward = old_norm
    from dist_moe.model import attention, rope

    def old_rope(x, cos, sin, offset=0):
        T = x.shape[-2]
        cos, sin = cos[offset:offset + T], sin[offset:offset + T]
        xf = x.float()
        return (xf * cos + rope.rotate_half(xf) * sin).to(x.dtype)
    attention.apply_rope = old_rope
if "fp32acc" in v:
    from dist_moe.train import engine
    original_ds = engine.deepspeed_config

    def ds_fp32(*a, **kw):
        out = original_ds(*a, **kw)
        out["data_types"] = {"grad_accum_dtype": "fp32"}
        return out
    engine.deepspeed_config = ds_fp32
if "torchce" in v:
    import torch.nn.functional as F
    from dist_moe.train import loop
    loop.cross_entropy = lambda logits, y: F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
import train_profile  # noqa
train_profile.main()
