"""Which parameters train, at which learning rate, in which stage of a hierarchical schedule.

Selectors are dotted module prefixes of the LightningModule (``backbone``, ``backbone.injector``, ``fuser``),
``-prefix`` to exclude (``[backbone, -backbone.injector]``: the DiT without the identity cross-attention),
and ``lora`` for LoRA adapter weights wherever they were injected.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

LORA = "lora"


def _matches(name: str, prefix: str) -> bool:
    if prefix == LORA:
        return "lora_" in name
    return name == prefix or name.startswith(prefix + ".")


def select_parameters(module: nn.Module, selectors: list[str], valid_roots: tuple[str, ...]) -> set[str]:
    """Names of the parameters picked by ``selectors`` (applied in order; later exclusions win)."""
    for sel in selectors:
        root = sel.lstrip("-").split(".")[0]
        if root != LORA and root not in valid_roots:
            raise ValueError(
                f"trainable selector {sel!r} names no module; valid roots: {list(valid_roots)} and {LORA!r} "
                "(prefix '-' excludes, e.g. [backbone, -backbone.injector])"
            )
    names = [n for n, _ in module.named_parameters()]
    picked: set[str] = set()
    for sel in selectors:
        exclude = sel.startswith("-")
        prefix = sel.lstrip("-")
        hits = {n for n in names if _matches(n, prefix)}
        picked = picked - hits if exclude else picked | hits
    return picked


def lr_multiplier(name: str, multipliers: dict[str, float]) -> float:
    """The multiplier of the longest matching prefix (1.0 when none matches)."""
    best, best_len = 1.0, -1
    for prefix, mult in multipliers.items():
        if _matches(name, prefix) and len(prefix) > best_len:
            best, best_len = float(mult), len(prefix)
    return best


@dataclass
class Stage:
    """One stage of hierarchical training: runs until ``until`` (a fraction of max_steps if <= 1, else a step)."""

    name: str
    until: float
    trainable: list[str]
    lr_multipliers: dict[str, float] = field(default_factory=dict)
    num_frames: int | None = None  # clip length in this stage (the first frames of each clip); None: all

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> Stage:
        missing = {"name", "until", "trainable"} - set(raw)
        if missing:
            raise ValueError(f"training stage {raw} lacks {sorted(missing)}; each stage needs name, until, trainable")
        return cls(
            name=str(raw["name"]),
            until=float(raw["until"]),
            trainable=list(raw["trainable"]),
            lr_multipliers=dict(raw.get("lr_multipliers") or {}),
            num_frames=int(raw["num_frames"]) if raw.get("num_frames") is not None else None,
        )

    def end_step(self, max_steps: int) -> int:
        if self.until <= 1.0:
            if max_steps is None or max_steps < 0:
                raise ValueError(
                    f"stage {self.name!r} uses a fraction until={self.until} but trainer.max_steps is unset"
                )
            return round(self.until * max_steps)
        return int(self.until)


def stage_index(stages: list[Stage], step: int, max_steps: int) -> int:
    for i, stage in enumerate(stages):
        if step < stage.end_step(max_steps):
            return i
    return len(stages) - 1


def apply_lora(module: nn.Module, rank: int, alpha: float, target_modules: list[str], dropout: float = 0.0) -> None:
    """Add LoRA adapters (peft) to the named linear layers of ``module`` in place."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules), lora_dropout=dropout)
    inject_adapter_in_model(config, module)


def fuse_lora(module: nn.Module) -> int:
    """Merge every LoRA adapter of ``module`` into the weight it adapts and put the plain layer back, so that
    the state dict has the base model's keys again; returns the number of fused layers."""
    from peft.tuners.lora import LoraLayer

    fused = 0
    for name, child in list(module.named_modules()):
        if isinstance(child, LoraLayer):
            child.merge()
            parent_name, _, attr = name.rpartition(".")
            setattr(module.get_submodule(parent_name) if parent_name else module, attr, child.get_base_layer())
            fused += 1
    return fused
