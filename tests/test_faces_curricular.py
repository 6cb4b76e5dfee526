"""CurricularFace IR-101: TFace key layout, strict loading from a file, output shape, at the full architecture."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from consisid_lab.faces.curricularface import CurricularFace, IRBackbone

STAGES = ((3, 64, 64), (13, 64, 128), (30, 128, 256), (3, 256, 512))  # (units, in_channels, depth)
BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _expected_keys(affine: bool) -> set[str]:
    """The layout of glint360k_curricular_face_r101_backbone.bin, written out from TFace's Backbone description."""
    keys = {"input_layer.0.weight", "input_layer.2.weight"} | {f"input_layer.1.{n}" for n in BN}
    unit = 0
    for n_units, in_ch, depth in STAGES:
        for j in range(n_units):
            p = f"body.{unit}"
            keys |= {f"{p}.res_layer.1.weight", f"{p}.res_layer.3.weight", f"{p}.res_layer.4.weight"}
            keys |= {f"{p}.res_layer.{i}.{n}" for i in (0, 2, 5) for n in BN}
            if j == 0 and in_ch != depth:
                keys |= {f"{p}.shortcut_layer.0.weight"} | {f"{p}.shortcut_layer.1.{n}" for n in BN}
            unit += 1
    keys |= {f"output_layer.0.{n}" for n in BN} | {"output_layer.3.weight", "output_layer.3.bias"}
    keys |= {f"output_layer.4.{n}" for n in (BN if affine else BN[2:])}
    return keys


@pytest.mark.parametrize("affine", [False, True])
def test_key_layout_matches_tface(affine):
    with torch.device("meta"):
        net = IRBackbone(embedding_bn_affine=affine)
    sd = net.state_dict()
    assert set(sd) == _expected_keys(affine)
    assert len([k for k in sd if k.endswith("res_layer.0.weight")]) == 49
    assert sd["output_layer.3.weight"].shape == (512, 512 * 7 * 7)
    assert sd["body.3.shortcut_layer.0.weight"].shape == (128, 64, 1, 1)
    n_params = sum(p.numel() for p in net.parameters())
    assert 60e6 < n_params < 70e6  # IR-101 with the 7x7x512 -> 512 head


def _randomised(net: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return net.eval()


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    net = _randomised(IRBackbone())
    path = tmp_path_factory.mktemp("cur") / "glint360k_curricular_face_r101_backbone.bin"
    torch.save(net.state_dict(), path)
    return net, path


def test_loads_strictly_and_embeds(weights):
    net, path = weights
    model = CurricularFace(path)
    model.train()  # stays a frozen evaluator: BatchNorm keeps its running statistics
    x = torch.rand(2, 3, 112, 112) * 2 - 1
    out = model.embed(x)
    assert out.shape == (2, 512)
    torch.testing.assert_close(out, net(x))
    assert not torch.allclose(out[0], out[1])  # different faces, different embeddings
    with pytest.raises(ValueError, match="112x112"):
        model.embed(torch.zeros(1, 3, 128, 128))


def test_wrong_layout_fails_loudly(weights, tmp_path):
    _, path = weights
    sd = torch.load(path, weights_only=True)
    del sd["body.10.res_layer.1.weight"]
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "broken.bin")
    with pytest.raises(RuntimeError, match=r"body\.10\.res_layer\.1\.weight"):
        CurricularFace(tmp_path / "broken.bin")
    with pytest.raises(FileNotFoundError, match="glint360k_curricular_face_r101_backbone.bin"):
        CurricularFace(tmp_path / "missing.bin")


def test_stage_layout_is_read_from_the_file(tmp_path):
    from consisid_lab.faces.curricularface import IR101_DEPTHS, IR101_UNITS, ir_layout

    with torch.device("meta"):
        assert ir_layout(IRBackbone().state_dict()) == (IR101_UNITS, IR101_DEPTHS)
    small = IRBackbone(units=(1, 2, 1, 1), depths=(8, 16, 24, 32)).eval()
    torch.save(small.state_dict(), tmp_path / "small.bin")
    loaded = CurricularFace(tmp_path / "small.bin")
    x = torch.randn(2, 3, 112, 112)
    assert torch.allclose(loaded(x), small(x), atol=1e-6)
