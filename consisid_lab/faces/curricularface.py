"""CurricularFace IR-101 (FaceSim-Cur): the improved-residual face backbone, loading TFace-layout state dicts.

The evaluation weights ``glint360k_curricular_face_r101_backbone.bin`` are a plain torch state dict in the layout of
TFace / insightface-pytorch's ``Backbone``, which this module reproduces name for name:

- ``input_layer.{0,1,2}``: 3x3 conv (64, no bias), BatchNorm2d, PReLU.
- ``body.{0..48}``: 49 improved-residual units in four stages of [3, 13, 30, 3] units with depths
  [64, 128, 256, 512]; the first unit of each stage has stride 2. Each unit holds ``res_layer.{0..5}`` (BN, 3x3 conv,
  BN, PReLU, 3x3 conv with the stride, BN) and ``shortcut_layer``: a 1x1 max-pool (no parameters) when the depth is
  unchanged, else ``shortcut_layer.{0,1}`` = 1x1 strided conv (no bias) + BN.
- ``output_layer.{0,1,2,3,4}``: BatchNorm2d(512), Dropout, Flatten, Linear(512*7*7, 512), BatchNorm1d(512); the
  last BN has no affine parameters in TFace's weights (``affine=False``) and has them in insightface-pytorch's.

Input: aligned 112x112 RGB faces in [-1, 1] (``(x / 255 - 0.5) / 0.5``); output: the 512-d embedding.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

INPUT_SIZE = 112
EMBED_DIM = 512
# IR-101: units per stage and the depth of each stage.
IR101_UNITS = (3, 13, 30, 3)
IR101_DEPTHS = (64, 128, 256, 512)
STEM_CHANNELS = 64
FEATURE_GRID = INPUT_SIZE // 16  # four stride-2 stages: 112 -> 7
DROPOUT = 0.4  # TFace's training value; inactive in eval mode


class ImprovedResidualUnit(nn.Module):
    """BN -> conv -> BN -> PReLU -> strided conv -> BN, plus a shortcut (the IR unit of ArcFace's ResNets)."""

    def __init__(self, in_channels: int, depth: int, stride: int) -> None:
        super().__init__()
        if in_channels == depth:
            # a 1x1 max-pool is just striding: the original keeps it so that the key layout has no shortcut weights
            self.shortcut_layer = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(
                nn.Conv2d(in_channels, depth, 1, stride, bias=False), nn.BatchNorm2d(depth)
            )
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_channels),
            nn.Conv2d(in_channels, depth, 3, 1, 1, bias=False),
            nn.BatchNorm2d(depth),
            nn.PReLU(depth),
            nn.Conv2d(depth, depth, 3, stride, 1, bias=False),
            nn.BatchNorm2d(depth),
        )

    def forward(self, x: Tensor) -> Tensor:  # (B, C_in, H, W) -> (B, depth, H / stride, W / stride)
        return self.res_layer(x) + self.shortcut_layer(x)


class IRBackbone(nn.Module):
    """IR-ResNet face backbone (IR-101 by default) with TFace's parameter names."""

    def __init__(
        self,
        units: tuple[int, ...] = IR101_UNITS,
        depths: tuple[int, ...] = IR101_DEPTHS,
        embedding_bn_affine: bool = False,
    ) -> None:
        super().__init__()
        self.input_layer = nn.Sequential(
            nn.Conv2d(3, STEM_CHANNELS, 3, 1, 1, bias=False), nn.BatchNorm2d(STEM_CHANNELS), nn.PReLU(STEM_CHANNELS)
        )
        body, in_ch = [], STEM_CHANNELS
        for n, depth in zip(units, depths):
            body.append(ImprovedResidualUnit(in_ch, depth, 2))
            body.extend(ImprovedResidualUnit(depth, depth, 1) for _ in range(n - 1))
            in_ch = depth
        self.body = nn.Sequential(*body)
        self.output_layer = nn.Sequential(
            nn.BatchNorm2d(in_ch),
            nn.Dropout(DROPOUT),
            nn.Flatten(),
            nn.Linear(in_ch * FEATURE_GRID * FEATURE_GRID, EMBED_DIM),
            nn.BatchNorm1d(EMBED_DIM, affine=embedding_bn_affine),
        )

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            raise ValueError(f"IR backbone expects aligned {INPUT_SIZE}x{INPUT_SIZE} faces, got {tuple(x.shape)}")
        return self.output_layer(self.body(self.input_layer(x)))  # (B, 512)


def ir_layout(state: dict[str, Tensor]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Units per stage and stage depths of a TFace-layout state dict, read off the output width of each unit's convs
    (a stage is a run of units of one depth: IR-101 gives ``(3, 13, 30, 3)`` and ``(64, 128, 256, 512)``). A unit
    missing a key still counts (the strict load then names the key)."""
    units_found = {int(k.split(".")[1]) for k in state if k.startswith("body.") and k.split(".")[1].isdigit()}
    if not units_found:
        raise ValueError("not an IR backbone state dict: no body.<i>. keys")
    depths: list[int] = []
    for i in range(max(units_found) + 1):
        width = next(
            (int(state[k].shape[0]) for k in (f"body.{i}.res_layer.{j}.weight" for j in (1, 4, 5)) if k in state),
            depths[-1] if depths else None,
        )
        if width is None:
            raise ValueError(f"IR backbone state dict: unit body.{i} has no conv or BN weight to read its depth from")
        depths.append(width)
    units: list[int] = []
    stage_depths: list[int] = []
    for d in depths:
        if stage_depths and stage_depths[-1] == d:
            units[-1] += 1
        else:
            stage_depths.append(d)
            units.append(1)
    return tuple(units), tuple(stage_depths)


class CurricularFace(nn.Module):
    """CurricularFace IR-101 embeddings from a state-dict file (strict loading; the stage layout is read from the
    file, so smaller IR backbones in the same layout load too).

    Args:
        path: ``glint360k_curricular_face_r101_backbone.bin`` (a torch state dict, optionally under ``state_dict``).
        embedding_bn_affine: whether the final BatchNorm1d has weights; ``None`` follows the file.
    """

    def __init__(self, path: str | Path, embedding_bn_affine: bool | None = None) -> None:
        super().__init__()
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"CurricularFace weights {path} not found; expected glint360k_curricular_face_r101_backbone.bin"
            )
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        state = {k.removeprefix("module."): v for k, v in state.items()}  # saved from DataParallel
        if embedding_bn_affine is None:
            embedding_bn_affine = "output_layer.4.weight" in state
        units, depths = ir_layout(state)
        if (units, depths) != (IR101_UNITS, IR101_DEPTHS):
            logger.info("%s: an IR backbone with stages %s of depths %s (not IR-101)", path, units, depths)
        with torch.device("meta"):
            net = IRBackbone(units, depths, embedding_bn_affine=embedding_bn_affine)
        # every parameter and buffer of the backbone is persistent, so a strict load materialises all of them
        net.load_state_dict(state, strict=True, assign=True)
        self.backbone = net.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> CurricularFace:
        # a frozen evaluator: BatchNorm must keep its running statistics even inside a module put in train mode
        return super().train(False)

    @torch.no_grad()
    def embed(self, faces: Tensor) -> Tensor:
        """``(B, 3, 112, 112)`` aligned RGB faces in [-1, 1] -> ``(B, 512)`` embeddings (not normalised)."""
        return self.backbone(faces)

    def forward(self, faces: Tensor) -> Tensor:
        return self.embed(faces)
