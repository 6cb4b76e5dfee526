"""Small face models in the published directory's ``face_encoder/`` layout, built here with random weights.

What diffusers' ``consisid_utils.prepare_face_models`` loads, at the names it loads them from:

- ``face_encoder/detection_Resnet50_Final.pth``: facexlib's RetinaFace (ResNet-50). Random backbone; the heads are
  nearly constant so that every anchor is a confident face whose five points sit where a face's would in its box
  (a little image-dependent noise kept, so the detection still depends on the pixels).
- ``face_encoder/parsing_bisenet.pth``: facexlib's BiSeNet, random, its output only
  background, skin or hair (so the pixels decide what is whitened), and
  ``parsing_parsenet.pth`` (ParseNet, random), which facexlib's helper loads before diffusers replaces it.
- ``face_encoder/models/antelopev2/``: a tiny ArcFace-shaped ``glintr100.onnx`` and a fake SCRFD
  ``scrfd_10g_bnkps.onnx`` reporting faces at fixed places (or none).
- ``face_encoder/EVA02_CLIP_L_336_psz14_s6B.pt``: an EVA-CLIP of the released architecture (rotary, SwiGLU, sub-LN)
  but 21 blocks of width 32 at 112 px, registered under the released model name by :func:`small_eva_config`.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

EVA_NAME = "EVA02-CLIP-L-14-336"
SMALL_EVA = {
    "embed_dim": 32,
    "vision_cfg": {
        "image_size": 112,
        "layers": 21,  # hidden states entering blocks 4, 8, 12, 16, 20
        "width": 32,
        "drop_path_rate": 0,
        "head_width": 16,
        "mlp_ratio": 2.6667,
        "patch_size": 14,
        "eva_model_name": "eva-clip-l-14-336",
        "xattn": True,
        "fusedLN": True,
        "rope": True,
        "pt_hw_seq_len": 16,
        "intp_freq": True,
        "naiveswiglu": True,
        "subln": True,
    },
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1, "fusedLN": True},
}
# Fake SCRFD faces in the 640 x 640 detector frame: (anchor x, anchor y) on the stride-32 grid, half-size in strides.
SCRFD_FACES = {"large": (9, 8, 3.0), "small": (14, 14, 1.0)}
DET = 640


def small_eva_config(monkeypatch) -> None:
    """Register the small EVA-CLIP under the released model name for this test only."""
    from consisid_eva_clip import factory

    monkeypatch.setitem(factory._MODEL_CONFIGS, EVA_NAME, copy.deepcopy(SMALL_EVA))


def _retinaface_state(seed: int) -> dict[str, torch.Tensor]:
    from facexlib.detection.retinaface import RetinaFace

    torch.manual_seed(seed)
    net = RetinaFace(network_name="resnet50", half=False, device="cpu")
    with torch.no_grad():
        for heads, bias in (
            (net.ClassHead, torch.tensor([-6.0, 6.0])),
            (net.BboxHead, torch.zeros(4)),
            # landmark offsets in units of 0.1 anchor sides (facexlib's variance): eyes, nose, mouth corners
            (net.LandmarkHead, torch.tensor([-2.0, -1.0, 2.0, -1.0, 0.0, 0.5, -1.6, 2.0, 1.6, 2.0]) * 1.5),
        ):
            for head in heads:
                conv = head.conv1x1
                conv.weight.mul_(1e-3)
                per_anchor = conv.out_channels // bias.numel()
                conv.bias.copy_(bias.repeat(per_anchor))
    return {k: v.half() if v.is_floating_point() else v for k, v in net.state_dict().items()}  # half the file size


def _parsing_state(name: str, seed: int) -> dict[str, torch.Tensor]:
    from facexlib.parsing.bisenet import BiSeNet
    from facexlib.parsing.parsenet import ParseNet

    torch.manual_seed(seed)
    net = BiSeNet(num_class=19) if name == "bisenet" else ParseNet(in_size=512, out_size=512, parsing_ch=19)
    with torch.no_grad():
        if name == "bisenet":
            # background (whitened) against skin and hair (kept): the pixels decide, so the crop is part white
            keep = torch.zeros(19, 1, 1, 1)
            keep[[0, 1, 17]] = 1.0
            w = net.conv_out.conv_out.weight
            w.mul_(keep)
            w[0] = -w[1]  # background exactly where skin scores below zero
    return {k: v.half() if v.is_floating_point() else v for k, v in net.state_dict().items()}


class TinyArcFace(nn.Module):
    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.body = nn.Sequential(*[nn.Conv2d(3 if i == 0 else c, c, 3, 2, 1) for i in range(4)])  # 112 -> 7
        self.fc = nn.Linear(c * 49, 512)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.body(x), 1))


def export_arcface_onnx(net: nn.Module, path: Path | str) -> None:
    """``net`` as an insightface recognition ONNX file (input ``data`` 112 x 112, output ``fc1``, dynamic batch)."""
    # The TorchScript exporter needs no onnxscript (absent here); torch flags it as deprecated.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            net,
            torch.zeros(1, 3, 112, 112),
            str(path),
            dynamo=False,
            input_names=["data"],
            output_names=["fc1"],
            dynamic_axes={"data": {0: "batch"}, "fc1": {0: "batch"}},
        )


def _export_arcface(path: Path, seed: int) -> None:
    torch.manual_seed(seed)
    export_arcface_onnx(TinyArcFace().eval(), path)


def _fake_scrfd(path: Path, faces: dict[str, tuple[int, int, float]]) -> None:
    """SCRFD's 9 outputs (scores, boxes, keypoints for strides 8, 16, 32; 2 anchors) reporting ``faces``."""
    import onnx
    from onnx import helper, numpy_helper

    nodes, outputs, inits = [], [], []
    x = helper.make_tensor_value_info("input.1", onnx.TensorProto.FLOAT, [1, 3, DET, DET])
    nodes.append(helper.make_node("ReduceSum", ["input.1"], ["sum"], keepdims=0))
    nodes.append(helper.make_node("Mul", ["sum", "zero"], ["dep"]))
    inits.append(numpy_helper.from_array(np.zeros((), np.float32), "zero"))
    tensors = {}
    for s in (8, 16, 32):
        n = (DET // s) ** 2 * 2
        scores, boxes, kps = np.zeros((n, 1), np.float32), np.zeros((n, 4), np.float32), np.zeros((n, 10), np.float32)
        if s == 32:
            for ax, ay, half in faces.values():
                i = (ay * (DET // s) + ax) * 2
                scores[i], boxes[i] = 0.9, half
                kps[i] = (np.array([[-0.4, -0.3], [0.4, -0.3], [0, 0.1], [-0.3, 0.5], [0.3, 0.5]]) * half).reshape(-1)
        tensors.update({f"score_{s}": scores, f"bbox_{s}": boxes, f"kps_{s}": kps})
    for kind in ("score", "bbox", "kps"):
        for s in (8, 16, 32):
            name = f"{kind}_{s}"
            inits.append(numpy_helper.from_array(tensors[name], f"{name}_const"))
            nodes.append(helper.make_node("Add", [f"{name}_const", "dep"], [name]))
            outputs.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, list(tensors[name].shape)))
    model = helper.make_model(
        helper.make_graph(nodes, "fake_scrfd", [x], outputs, initializer=inits),
        opset_imports=[helper.make_opsetid("", 13)],
    )
    model.ir_version = 8
    onnx.save(model, str(path))


def build_face_encoder(root: Path, monkeypatch, seed: int = 0, scrfd_faces: dict | None = None) -> Path:
    """Write all released face models under ``root / "face_encoder"``; returns ``root`` (the model path)."""
    from consisid_eva_clip import create_model

    fe = root / "face_encoder"
    ante = fe / "models" / "antelopev2"
    ante.mkdir(parents=True, exist_ok=True)
    torch.save(_retinaface_state(seed), fe / "detection_Resnet50_Final.pth")
    torch.save(_parsing_state("bisenet", seed + 1), fe / "parsing_bisenet.pth")
    # FaceRestoreHelper loads ParseNet first (diffusers then swaps in BiSeNet): the file must be there
    torch.save(_parsing_state("parsenet", seed + 4), fe / "parsing_parsenet.pth")
    _export_arcface(ante / "glintr100.onnx", seed + 2)
    _fake_scrfd(ante / "scrfd_10g_bnkps.onnx", SCRFD_FACES if scrfd_faces is None else scrfd_faces)
    small_eva_config(monkeypatch)
    torch.manual_seed(seed + 3)
    clip = create_model(EVA_NAME, None, force_custom_clip=True)
    torch.save(clip.state_dict(), fe / "EVA02_CLIP_L_336_psz14_s6B.pt")
    return root
