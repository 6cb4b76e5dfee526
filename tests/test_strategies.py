"""Real-scale strategies: DDP runs on 2 CPU processes (gloo), FSDP builds (and runs on a GPU), DeepSpeed's config is
validated; the training sampler shards itself across processes."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, TINY_OVERRIDES

from consisid_lab.data.sampler import ResumableSampler
from consisid_lab.utils.instantiate import instantiate
from consisid_lab.utils.strategies import check_strategy


def test_sampler_shards_are_the_single_process_stream_interleaved():
    single = list(ResumableSampler(7, seed=3, start=5, length=40))
    shards = [list(ResumableSampler(7, seed=3, start=5, length=20, rank=r, num_replicas=2)) for r in range(2)]
    assert [i for pair in zip(*shards) for i in pair] == single
    with pytest.raises(ValueError, match="rank=2, num_replicas=2"):
        ResumableSampler(7, rank=2, num_replicas=2)


def test_strategy_configs_compose_and_build(train_cfg):
    ddp = train_cfg("trainer=ddp")
    assert ddp.trainer.strategy == "ddp" and ddp.trainer.devices == 2
    assert ddp.trainer.use_distributed_sampler is False  # the sampler shards itself
    check_strategy(ddp.trainer)

    fsdp = train_cfg("trainer=fsdp")
    from diffusers.models.transformers.cogvideox_transformer_3d import CogVideoXBlock
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import ShardingStrategy

    strategy = instantiate(fsdp.trainer.strategy)
    assert isinstance(strategy, FSDPStrategy)
    assert strategy.sharding_strategy == ShardingStrategy.FULL_SHARD
    assert CogVideoXBlock in strategy.kwargs["auto_wrap_policy"]._module_classes  # each DiT block its own unit
    check_strategy(fsdp.trainer)
    with pytest.raises(ValueError, match="trainer=fsdp needs CUDA GPUs.*accelerator='cpu'.*trainer=ddp"):
        check_strategy(train_cfg("trainer=fsdp", "trainer.accelerator=cpu").trainer)


def test_deepspeed_config_composes_and_is_validated(train_cfg):
    cfg = train_cfg("trainer=deepspeed").trainer
    assert (cfg.strategy, cfg.precision, cfg.accelerator) == ("deepspeed_stage_2", "bf16-mixed", "gpu")
    if importlib.util.find_spec("deepspeed") is None:
        with pytest.raises(ImportError, match="needs the deepspeed package.*pip install deepspeed"):
            check_strategy(cfg)
    else:
        check_strategy(cfg)
    with pytest.raises(ValueError, match="'deepspeed_stage_4' is not a DeepSpeed strategy"):
        check_strategy(train_cfg("trainer=deepspeed", "trainer.strategy=deepspeed_stage_4").trainer)
    with pytest.raises(ValueError, match="trainer.precision='64-true' with DeepSpeed"):
        check_strategy(train_cfg("trainer=deepspeed", "trainer.precision=64-true").trainer)
    with pytest.raises(ValueError, match="needs GPUs, but trainer.accelerator='cpu'"):
        check_strategy(train_cfg("trainer=deepspeed", "trainer.accelerator=cpu").trainer)


def _run(tmp_path, standin_cache, *overrides: str) -> tuple[subprocess.CompletedProcess, object]:
    out = tmp_path / "run"
    env = {**os.environ, "CONSISID_LAB_CACHE": str(standin_cache), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "consisid_lab.train", *TINY_OVERRIDES, "trainer.max_steps=2", "test=false",
        f"paths.cache_dir={standin_cache}", f"hydra.run.dir={out}", *overrides,
    ]  # fmt: skip
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600), out


@pytest.mark.slow  # about 60 s on 2 shared cores; the fast representatives are the build and sampler tests above
def test_ddp_trains_on_two_cpu_processes_with_gloo(tmp_path, standin_cache):
    proc, out = _run(tmp_path, standin_cache, "trainer=ddp", "trainer.accelerator=cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MEMBER: 2/2" in proc.stderr  # both processes joined
    record = json.loads((out / "metrics.json").read_text())
    assert record["status"] == "completed"
    with open(out / "csv" / "metrics.csv") as f:
        losses = [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert (out / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.gpu
def test_fsdp_trains_on_a_gpu(tmp_path, standin_cache):
    proc, out = _run(tmp_path, standin_cache, "trainer=fsdp", "trainer.devices=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((out / "metrics.json").read_text())
    assert record["status"] == "completed"
    assert (out / "checkpoints" / "last.ckpt").exists()  # a directory of shards (state_dict_type: sharded)
