"""The released ConsisID configuration at full scale, built on the meta device (no memory, no weights)."""

from __future__ import annotations

import json

import pytest
import torch

from consisid_lab.models.consisid import build_from_config, consisid_forward, to_diffusers_state_dict
from consisid_lab.models.published import RELEASED_CONFIG
from consisid_lab.types import IdentityFeatures

TOTAL_PARAMS = 6_162_495_040
IDENTITY_PARAMS = 592_015_360
IDENTITY_PREFIXES = ("fuser.", "backbone.injector.")


def _released():
    with torch.device("meta"):
        return build_from_config(RELEASED_CONFIG)


def test_released_composition_has_the_published_parameter_counts():
    model = _released()
    total = sum(p.numel() for p in model.parameters())
    identity = sum(p.numel() for n, p in model.named_parameters() if n.startswith(IDENTITY_PREFIXES))
    assert (total, identity) == (TOTAL_PARAMS, IDENTITY_PARAMS)
    assert len(model.backbone.blocks) == 42 and len(model.backbone.injector.layers) == 21
    assert model.backbone.in_channels == 32 and model.backbone.inner_dim == 3072 and not model.global_encoder.use_kps
    # Every weight has a released (diffusers) name: the published checkpoint loads strictly.
    keys = to_diffusers_state_dict(model)
    assert "local_facial_extractor.latents" in keys and "perceiver_cross_attention.20.to_out.weight" in keys


def test_forward_shapes_at_49x480x720():
    model = _released()
    b, f, h, w = 2, 13, 60, 90  # 49 frames x 480 x 720 through the x4 / x8 VAE
    with torch.device("meta"):
        x = torch.empty(b, f, 32, h, w)
        text = torch.empty(b, 226, 4096)
        t = torch.zeros(b, dtype=torch.long)
        id_cond = torch.empty(b, 1280)
        vit = [torch.empty(b, 577, 1024) for _ in range(5)]
    rotary = model.backbone.rotary_embedding(f, h, w, device="meta")
    assert rotary[0].shape == (f * (h // 2) * (w // 2), 64)
    tokens = model.fuser(
        IdentityFeatures(vectors={"id_cond": id_cond}, tokens={f"vit_{k}": v for k, v in enumerate(vit)})
    )
    assert tokens.shape == (b, 32, 2048)
    out = consisid_forward(model, x, text, t, id_cond=id_cond, id_vit_hidden=vit)
    assert out.shape == (b, f, 16, h, w) and out.is_meta


def test_identity_only_training_trains_exactly_the_identity_modules():
    model = _released()
    model.requires_grad_(False)
    for module in (model.fuser, model.backbone.injector):
        module.requires_grad_(True)
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert sum(trainable.values()) == IDENTITY_PARAMS
    assert all(n.startswith(IDENTITY_PREFIXES) for n in trainable)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert frozen == TOTAL_PARAMS - IDENTITY_PARAMS
    # The frozen part is the whole CogVideoX backbone: its blocks, embeddings and output head.
    assert not any(p.requires_grad for p in model.backbone.transformer.parameters())


# ------------------------------------------------------------------------------------------ the GPU benchmark
def _bench_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"
    spec = importlib.util.spec_from_file_location("bench_gpu", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_gpu_defaults_and_fail_fast_without_cuda(monkeypatch):
    bench = _bench_module()
    args = bench.parse_args([])
    assert (args.config, args.frames, args.height, args.width) == ("released", 49, 480, 720)
    assert bench.parse_args(["--config", "tiny"]).frames == 9
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        bench.main([])


def test_bench_gpu_tiny_cpu_path_reports_both_implementations(capsys):
    bench = _bench_module()
    report = bench.main(["--config", "tiny", "--device", "cpu", "--train-steps", "1", "--sample-steps", "2"])
    out = capsys.readouterr().out
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("{"))  # the report follows the per-knob lines
    printed = json.loads("\n".join(lines[start:]))
    assert printed == report and "s/step" in "\n".join(lines[:start])
    for key in ("train", "sample"):
        assert report[f"{key}_s_per_step"] > 0 and report[f"{key}_s_per_step_diffusers"] > 0
        assert report[f"{key}_time_ratio"] > 0
