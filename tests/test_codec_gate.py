"""The stand-in video codec (CogVideoX layout) and the face-presence gate of the metrics."""

from __future__ import annotations

import pytest
import torch

from consisid_lab.encoders.codec import CodecConfig, CodecRecipe, StandInVideoCodec, train_codec
from consisid_lab.encoders.face_gate import NEGATIVE_KINDS, FaceGate, GateRecipe, make_negatives, train_face_gate


def test_codec_has_the_cogvideox_latent_layout() -> None:
    torch.manual_seed(0)
    codec = StandInVideoCodec(CodecConfig(latent_channels=8)).eval()
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
    codec = StandInVideoCodec(CodecConfig(latent_channels=4)).eval()
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


def _low_rank_clips(n: int, rank: int, seed: int) -> torch.Tensor:
    """uint8 clips ``(n, 9, 3, 16, 16)`` whose 4x4 blocks lie in a ``rank``-dimensional affine space."""
    gen = torch.Generator().manual_seed(seed)
    codec = StandInVideoCodec(CodecConfig(latent_channels=4, refiner_widths=()))
    d = codec.config.block_dim
    directions = torch.linalg.qr(torch.randn(d, rank, generator=gen))[0]
    coeffs = torch.randn(n, 3, 4, 4, rank, generator=gen) * 0.15
    blocks = (coeffs @ directions.T).movedim(-1, 2)  # (n, 3 latent frames, D, 4, 4)
    blocks[:, 0] = blocks[:, 0].unflatten(1, (4, 3 * 16)).mean(1, keepdim=True).expand(-1, 4, -1, -1, -1).flatten(1, 2)
    video = codec.unblocks(blocks)
    return ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def test_fitted_codec_is_an_orthonormal_projection_that_keeps_what_its_rank_holds() -> None:
    """The fit finds the clips' principal subspace: clips of rank <= C come back up to rounding, latents are unit
    variance per channel, and decode then encode gives the latents back (a projection)."""
    clips = _low_rank_clips(24, rank=4, seed=0)
    codec = StandInVideoCodec(CodecConfig(latent_channels=4, refiner_widths=()))
    calls = []
    recipe = CodecRecipe(identities=24, videos_per_identity=1, chunk=5, mirror=False, refine_steps=0)  # no refiner
    train_codec(codec, clips, recipe, on_step=lambda: calls.append(1))
    assert len(calls) == recipe.steps == 5
    assert CodecRecipe(identities=24, videos_per_identity=1, chunk=5, refine_steps=7).steps == 10 + 7  # mirrored
    for i in range(2):
        gram = codec.basis[i].T @ codec.basis[i]
        torch.testing.assert_close(gram, torch.eye(4), atol=1e-5, rtol=0)
    video = clips.float() / 127.5 - 1
    z = codec.encode(video)
    assert (codec.decode(z) - video).abs().max() < 2.5 / 127.5  # uint8 rounding of a rank-4 clip
    std = z.movedim(2, -1).reshape(-1, 4).std(0)
    torch.testing.assert_close(std, torch.ones(4), atol=0.05, rtol=0)
    torch.testing.assert_close(codec.encode(codec.decode(z)), z, atol=1e-4, rtol=0)
    # Fewer channels than the clips' rank lose what the dropped directions held, and keep the most of it.
    narrow = StandInVideoCodec(CodecConfig(latent_channels=2, refiner_widths=()))
    train_codec(narrow, clips, CodecRecipe(chunk=5, mirror=False, refine_steps=0))
    err2 = (narrow.decode(narrow.encode(video)) - video).square().mean()
    assert err2 > 1e-4
    rand = StandInVideoCodec(CodecConfig(latent_channels=2, refiner_widths=()))
    rand.block_mean.copy_(narrow.block_mean)
    rand.latent_std.copy_(narrow.latent_std)
    rand.basis.copy_(torch.linalg.qr(torch.randn(2, rand.config.block_dim, 2))[0])
    assert (rand.decode(rand.encode(video)) - video).square().mean() > err2


def test_the_refiner_starts_at_zero_and_learns_to_undo_latent_noise() -> None:
    """Untrained, the refined decoder is the back-projection; trained on noisy latents of benchmark clips, it
    reconstructs held-out clips from noisy latents better than the back-projection does."""
    from dataclasses import replace

    from consisid_lab.encoders.codec import render_clip_pool
    from consisid_lab.encoders.store import default_generator_config

    config = replace(default_generator_config(), height=32, width=32)
    recipe = CodecRecipe(identities=12, videos_per_identity=1, refine_steps=60, batch_size=8, crop=32)
    clips = render_clip_pool(config, recipe)
    held_out = render_clip_pool(config, replace(recipe, seed=1))
    torch.manual_seed(0)
    codec = StandInVideoCodec(CodecConfig(latent_channels=8))
    video = held_out.float() / 127.5 - 1
    z = codec.encode(video)
    assert torch.equal(codec.decode(z), codec.decode_linear(z))
    stats = train_codec(codec, clips, recipe)
    assert stats["final_loss"] != stats["reconstruction_l1"]  # the refiner's loss
    with torch.no_grad():
        z = codec.encode(video)
        noisy = z + 0.5 * torch.randn(z.shape, generator=torch.Generator().manual_seed(2))
        refined = (codec.decode(noisy) - video).abs().mean()
        linear = (codec.decode_linear(noisy) - video).abs().mean()
    assert refined < 0.8 * linear, (float(refined), float(linear))


def test_codec_config_errors_name_the_valid_range() -> None:
    with pytest.raises(ValueError, match="latent_channels=500 must be in \\[1, 192\\]"):
        CodecConfig(latent_channels=500)
    with pytest.raises(ValueError, match="standardize='pixel'"):
        CodecConfig(standardize="pixel")
    with pytest.raises(ValueError, match="refiner_widths=\\(24, 48\\) must be"):
        CodecConfig(refiner_widths=(24, 48))


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
