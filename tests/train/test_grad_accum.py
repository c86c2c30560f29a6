"""Micro-step gradients are summed in fp32 under bf16 + ZeRO-2 (train.grad_accum_dtype=auto), in DeepSpeed itself.

One weight w and 16 micro steps whose losses are 256*w, then 15 times 1*w: DeepSpeed scales each by 1/16,
so the gradients are 16 and then 1/16 (all exact in bf16). Summed in fp32 they give 271/16; summed in bf16,
16 + 1/16 rounds back to 16 every time. The engine's global gradient norm tells the two apart.
"""

import os

import pytest
import torch
import torch.multiprocessing as mp

from dist_moe.config import ConfigError, load_config
from dist_moe.train.engine import deepspeed_config, free_port

MICRO_STEPS = 16


def accumulated_gradient(grad_accum_dtype: str) -> float:
    import deepspeed

    cfg = load_config("tiny", ["train.precision=bf16", "train.zero_stage=2", f"train.grad_accum_steps={MICRO_STEPS}",
                               "train.micro_batch_size=1", f"train.grad_accum_dtype={grad_accum_dtype}"])
    model = torch.nn.Linear(1, 1, bias=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer,
                                      config=deepspeed_config(cfg, world_size=1, device_type="cpu"))
    for c in [256.0] + [1.0] * (MICRO_STEPS - 1):
        engine.backward(engine(torch.full((1, 1), c, dtype=torch.bfloat16)).sum())
        engine.step()
    return float(engine.get_global_grad_norm())


def worker(rank: int, port: int, results) -> None:
    os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0")
    torch.set_num_threads(1)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    results["auto"] = accumulated_gradient("auto")
    results["bf16"] = accumulated_gradient("bf16")


def test_bf16_zero2_sums_micro_step_gradients_in_fp32():
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(worker, args=(free_port(), results), nprocs=1, join=True)
        results = dict(results)
    assert results["auto"] == pytest.approx(271 / 16, rel=1e-6)
    assert results["bf16"] == pytest.approx(16.0, rel=1e-6)  # what DeepSpeed's default would have given


def test_grad_accum_dtype_choices_deepspeed_cannot_honour_are_one_line_errors():
    for stage in (0, 1):
        cfg = load_config("tiny", ["train.precision=bf16", f"train.zero_stage={stage}", "train.grad_accum_dtype=fp32"])
        with pytest.raises(ConfigError, match="'train.grad_accum_dtype' = 'fp32'.*only under ZeRO-2"):
            deepspeed_config(cfg, world_size=1, device_type="cpu")
        auto = load_config("tiny", ["train.precision=bf16", f"train.zero_stage={stage}"])
        assert "data_types" not in deepspeed_config(auto, world_size=1, device_type="cpu")  # bf16 sums, no error
    fp32_params = load_config("tiny", ["train.precision=fp32", "train.grad_accum_dtype=bf16"])
    with pytest.raises(ConfigError, match="'train.grad_accum_dtype' = 'bf16'"):
        deepspeed_config(fp32_params, world_size=1, device_type="cuda")
