"""The stand-in video codec (CogVideoX layout) and the face-presence gate of the metrics."""

from __future__ import annotations

import pytest
import torch

from consisid_lab.encoders.codec import CodecConfig, StandInVideoCodec
from consisid_lab.encoders.face_gate import NEGATIVE_KINDS, FaceGate, GateRecipe, make_negatives, train_face_gate


def test_codec_has_the_cogvideox_latent_layout() -> None:
    torch.manual_seed(0)
    codec = StandInVideoCodec(CodecConfig(latent_channels=8, widths=(16, 32))).eval()
    video = torch.rand(2, 9, 3, 32, 48) * 2 - 1
    z = codec.encode(video)
    assert z.shape == (2, 3, 8, 8, 12)  # 4k+1 = 9 frames -> k+1 = 3 latent frames, x4 spatial
    assert codec.decode(z).shape == video.shape
    # One frame (a reference face) is one latent frame.
    assert codec.encode(video[:, :1]).shape == (2, 1, 8, 8, 12)
    with pytest.raises(ValueError, match="4k\\+1"):
        codec.encode(video[:, :8])


def test_codec_first_latent_frame_sees_frame_zero_only() -> None:
    """Causal like CogVideoX's VAE: the first latent frame depends on frame 0 alone, the others on their group."""
    torch.manual_seed(0)
    codec = StandInVideoCodec(CodecConfig(latent_channels=4, widths=(16, 32))).eval()
    video = torch.rand(1, 9, 3, 16, 16) * 2 - 1
    changed = video.clone()
    changed[:, 5:] = torch.rand(1, 4, 3, 16, 16)  # the last group only
    a, b = codec.encode(video), codec.encode(changed)
    assert torch.equal(a[:, :2], b[:, :2])
    assert not torch.allclose(a[:, 2], b[:, 2])
    # and the layout is exactly invertible
    grouped = codec.group_frames(video)
    assert grouped.shape == (1, 3, 12, 16, 16)
    assert torch.allclose(codec.ungroup_frames(grouped), video)


def test_standin_codec_from_the_store_rejects_sizes_with_the_valid_ones(tmp_path) -> None:
    from consisid_lab.models.vae import StandInCodec

    codec = StandInCodec(cache_dir=str(tmp_path), recipe="tiny")
    assert (codec.temporal_factor, codec.spatial_factor) == (4, 4)
    assert codec.latent_shape(9, 64, 64) == (3, codec.latent_channels, 16, 16)
    with pytest.raises(ValueError, match="4k\\+1"):
        codec.latent_shape(8, 64, 64)
    with pytest.raises(ValueError, match="multiple of 4"):
        codec.latent_shape(9, 62, 64)
    assert not any(p.requires_grad for p in codec.parameters())


def test_store_rebuilds_a_stale_codec(tmp_path, caplog) -> None:
    """A codec trained under another recipe (or renderer) is detected by its hash and rebuilt, never reused."""
    import json

    from consisid_lab.encoders.store import load_standins
    from consisid_lab.encoders.training import Recipe

    load_standins(tmp_path, recipe=Recipe.tiny())
    info_path = tmp_path / "tiny" / "codec" / "config.json"
    info = json.loads(info_path.read_text())
    info["key"] = "0" * 64
    info_path.write_text(json.dumps(info))
    with caplog.at_level("WARNING"):
        again = load_standins(tmp_path, recipe=Recipe.tiny())
    assert again.rebuilt == ["codec"]
    assert "codec" in caplog.text and "stale" in caplog.text


def test_negatives_cover_every_kind_and_stay_in_range() -> None:
    gen = torch.Generator().manual_seed(0)
    faces = torch.rand(64, 3, 32, 32) * 2 - 1
    neg = make_negatives(faces, gen)
    assert neg.shape == faces.shape
    assert neg.min() >= -1 and neg.max() <= 1
    assert len(NEGATIVE_KINDS) == 8


def _render_faces(split: str, n: int, seed: int) -> torch.Tensor:
    from consisid_lab.data.synthetic import SyntheticConfig, identity_seed, render_clip, sample_identity, sample_motion

    cfg = SyntheticConfig(num_frames=1)
    out = []
    for i in range(n):
        clip = render_clip(cfg, sample_identity(cfg, identity_seed(split, i)), sample_motion(cfg, seed + i))
        out += [clip.frames[0], clip.ref_face]
    return torch.from_numpy(__import__("numpy").stack(out)).permute(0, 3, 1, 2)  # (2n, 3, H, W) in [0, 1]


def test_a_briefly_trained_gate_rejects_noise_grey_and_colour_noise_and_accepts_faces() -> None:
    """The gate's contract on held-out identities: non-faces at most 5 %, faces at least 95 %."""
    torch.manual_seed(0)
    train = (_render_faces("evaluator", 96, 0) * 255).round().to(torch.uint8)
    gate = FaceGate()
    stats = train_face_gate(gate, train, GateRecipe(steps=120, batch_size=64))
    assert stats["train_accuracy"] > 0.95
    faces = _render_faces("test", 24, 10_000) * 2 - 1  # held-out identities, frames and references
    gen = torch.Generator().manual_seed(1)
    mean, std = faces.mean(dim=(2, 3), keepdim=True), faces.std(dim=(2, 3), keepdim=True)
    controls = {
        "noise": torch.randn(faces.shape, generator=gen).clamp(-1, 1),
        "colour_noise": (mean + std * torch.randn(faces.shape, generator=gen)).clamp(-1, 1),
        "grey": torch.zeros_like(faces),
    }
    assert gate.is_face(faces).float().mean() >= 0.95
    for name, x in controls.items():
        assert gate.is_face(x).float().mean() <= 0.05, name
