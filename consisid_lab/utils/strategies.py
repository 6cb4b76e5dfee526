"""Helpers referenced from trainer configs."""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from typing import Any


def dit_block_classes() -> set[type]:
    """Module classes FSDP wraps one by one: the DiT blocks (each also the unit of activation checkpointing)."""
    from diffusers.models.transformers.cogvideox_transformer_3d import CogVideoXBlock

    return {CogVideoXBlock}


# Lightning's registered DeepSpeed strategies and the precisions DeepSpeed trains in.
DEEPSPEED_STRATEGIES = (
    "deepspeed",
    "deepspeed_stage_1",
    "deepspeed_stage_1_offload",
    "deepspeed_stage_2",
    "deepspeed_stage_2_offload",
    "deepspeed_stage_3",
    "deepspeed_stage_3_offload",
    "deepspeed_stage_3_offload_nvme",
)
DEEPSPEED_PRECISIONS = ("bf16-mixed", "16-mixed", "32-true", "bf16-true", "16-true")


def strategy_name(trainer_cfg: Mapping[str, Any]) -> str:
    """The trainer config's strategy as a name: a string, or the ``_target_`` class of a strategy config."""
    strategy = trainer_cfg.get("strategy")
    if strategy is None:
        return "auto"
    if isinstance(strategy, str):
        return strategy
    return str(strategy.get("_target_", "")).rsplit(".", 1)[-1]


def check_strategy(trainer_cfg: Mapping[str, Any]) -> None:
    """Refuse, before anything is built, a strategy config that cannot run here, naming the value and the fix.

    DeepSpeed: a known ZeRO strategy name, a precision DeepSpeed trains in, GPUs, and the ``deepspeed`` package.
    FSDP (torch's FSDP, which Lightning's strategy wraps): a CUDA accelerator (it refuses CPU processes).
    """
    name = strategy_name(trainer_cfg)
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    if name.startswith("deepspeed") or name == "DeepSpeedStrategy":
        if name not in DEEPSPEED_STRATEGIES and name != "DeepSpeedStrategy":
            raise ValueError(
                f"trainer.strategy={name!r} is not a DeepSpeed strategy; use one of {DEEPSPEED_STRATEGIES}"
            )
        precision = str(trainer_cfg.get("precision", "32-true"))
        if precision not in DEEPSPEED_PRECISIONS:
            raise ValueError(
                f"trainer.precision={precision!r} with DeepSpeed; use one of {DEEPSPEED_PRECISIONS} (bf16-mixed as "
                "the paper trained)"
            )
        if accelerator not in ("gpu", "cuda", "auto"):
            raise ValueError(
                f"trainer=deepspeed needs GPUs, but trainer.accelerator={accelerator!r}; use trainer.accelerator=gpu, "
                "or trainer=ddp / trainer=fsdp"
            )
        if importlib.util.find_spec("deepspeed") is None:
            raise ImportError(
                f"trainer=deepspeed ({name}) needs the deepspeed package, which is not installed: `pip install "
                "deepspeed` (with a CUDA toolkit matching torch) on the GPU machine, or train with trainer=ddp or "
                "trainer=fsdp"
            )
    is_fsdp = name in ("fsdp", "FSDPStrategy") or name.startswith("fsdp_")
    if is_fsdp and accelerator not in ("gpu", "cuda", "auto"):
        raise ValueError(
            f"trainer=fsdp needs CUDA GPUs (torch's FSDP refuses CPU processes), but trainer.accelerator="
            f"{accelerator!r}; use trainer.accelerator=gpu, or trainer=ddp with trainer.accelerator=cpu for "
            "several CPU processes"
        )
