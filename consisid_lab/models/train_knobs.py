"""Speed knobs for training: fused AdamW and a frozen backbone kept in bfloat16 beside float32 trainable modules.

Selective activation checkpointing is ``model.gradient_checkpointing`` (``true``, an int ``k`` for every k-th
block, or ``attention``; :func:`consisid_lab.models.denoiser.checkpoint_policy`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

FROZEN_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def fused_supported_devices() -> list[str]:
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        return list(_get_fused_kernels_supported_devices())
    except ImportError:  # older / newer torch without the helper: the devices torch documents
        return ["cuda", "cpu", "mps", "xpu"]


def adamw_fused_options(fused: Any, params: Iterable[torch.Tensor]) -> dict[str, Any]:
    """AdamW keyword arguments for ``model.optimizer.fused``: ``{}`` when off (torch's default foreach kernels);
    ``{"fused": True}`` after checking that every parameter is floating point on a device with fused kernels."""
    if fused is None or fused is False:
        return {}
    if fused is not True:
        raise ValueError(f"model.optimizer.fused={fused!r}: use true or false")
    params = list(params)
    supported = fused_supported_devices()
    devices = sorted({p.device.type for p in params})
    unsupported = [d for d in devices if d not in supported]
    if unsupported:
        raise ValueError(
            f"model.optimizer.fused=true: torch has no fused AdamW on {unsupported} (fused kernels: {supported}); "
            "use model.optimizer.fused=false (the foreach kernels)"
        )
    bad = sorted({str(p.dtype) for p in params if not p.is_floating_point()})
    if bad:
        raise ValueError(f"model.optimizer.fused=true needs floating-point parameters, got {bad}; use fused=false")
    return {"fused": True}


def frozen_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in FROZEN_DTYPES:
        raise ValueError(f"model.frozen_dtype={name!r} is unknown; use one of {sorted(FROZEN_DTYPES)} or null")
    return FROZEN_DTYPES[name]


def cast_frozen(module: nn.Module, trainable: set[str], dtype: torch.dtype, prefix: str = "backbone.") -> list[str]:
    """Cast the floating-point parameters under ``prefix`` that never train (not in ``trainable``) to ``dtype``,
    in place; trainable ones (the injector, LoRA) stay as they are. Returns the names cast.

    The forward then needs autocast (``trainer.precision=bf16-mixed``), which runs every matmul in bfloat16 anyway:
    the frozen weights are stored at half the memory and not cast again each step."""
    cast = []
    for name, p in module.named_parameters():
        if name.startswith(prefix) and name not in trainable and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
            cast.append(name)
    return cast


def check_frozen_precision(dtype: torch.dtype | None, precision: Any) -> None:
    """The frozen-bf16 knob needs a mixed-precision trainer (autocast casts the float32 activations)."""
    if dtype is None:
        return
    wanted = "bf16-mixed" if dtype == torch.bfloat16 else "16-mixed"
    if str(precision) != wanted:
        raise ValueError(
            f"model.frozen_dtype={str(dtype).removeprefix('torch.')} needs trainer.precision={wanted} (autocast), "
            f"got {precision!r}; set trainer.precision={wanted} or model.frozen_dtype=null"
        )


def compile_blocks(blocks: nn.ModuleList, device: torch.device) -> int:
    """Regional compile for training: each DiT block compiled in place (``nn.Module.compile``: state-dict keys and
    checkpoints unchanged), the rest stays eager; one traced block serves all. Refused before anything is compiled
    where the toolchain is missing (the same checks as ``sampling.knobs.compile``). Returns the blocks compiled."""
    from consisid_lab.models.knobs import check_compile

    check_compile(device)
    for block in blocks:
        block.compile(dynamic=False)
    return len(blocks)


def check_fp8_training(device: torch.device) -> None:
    """FP8 training of the linears needs torchao and a CUDA GPU of compute capability >= 8.9."""
    import importlib.util

    from consisid_lab.models.knobs import KnobUnavailable

    nearest = "use model.frozen_dtype=bfloat16 with trainer.precision=bf16-mixed, or model.fp8_training=false"
    if device.type != "cuda":
        raise KnobUnavailable(
            f"model.fp8_training=true needs a CUDA GPU of compute capability >= 8.9; on {device.type} {nearest}"
        )
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        raise KnobUnavailable(
            f"model.fp8_training=true needs compute capability >= 8.9; this GPU has {major}.{minor}: {nearest}"
        )
    if importlib.util.find_spec("torchao") is None:
        raise KnobUnavailable(
            "model.fp8_training=true needs the `torchao` package (pip install 'consisid_lab[fast]'); without it "
            + nearest
        )


def fp8_training(blocks: nn.ModuleList, device: torch.device) -> int:
    """The DiT blocks' linears trained in FP8 through torchao (dynamic scaling); returns the linears converted.
    Linears whose sizes are not multiples of 16 (FP8 GEMM alignment) stay in high precision."""
    check_fp8_training(device)
    from torchao.float8 import convert_to_float8_training

    def eligible(module: nn.Module, _name: str) -> bool:
        return isinstance(module, nn.Linear) and module.in_features % 16 == 0 and module.out_features % 16 == 0

    before = sum(isinstance(m, nn.Linear) for m in blocks.modules())
    convert_to_float8_training(blocks, module_filter_fn=eligible)
    return before - sum(type(m) is nn.Linear for m in blocks.modules())
