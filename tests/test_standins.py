"""Stand-in encoders: interfaces (ArcFace last / penultimate, CLIP hidden states), cache round trip and rebuilds."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
import torch.nn.functional as F

from consisid_lab.encoders.captions import AttributeCaptioner
from consisid_lab.encoders.evaluator import BandPairEvaluator, EvaluatorConfig, EvaluatorNet
from consisid_lab.encoders.identity_net import ArcMarginLoss, IdentityNet, IdentityNetConfig
from consisid_lab.encoders.tiny_clip import TinyClip, TinyClipConfig, to_grayscale


def _faces(b: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# --- architectures -----------------------------------------------------------------------------------


def test_identity_net_exposes_last_and_penultimate() -> None:
    cfg = IdentityNetConfig(stem_width=8, widths=(8, 16, 24), embed_dim=32)
    net = IdentityNet(cfg).eval()
    last, penultimate = net.forward_features(_faces(3))
    assert last.shape == (3, 32)
    assert penultimate.shape == (3, 24, 4, 4)  # 64 / 2**4
    tokens = net.tokens(_faces(3))
    assert tokens.shape == (3, net.num_tokens, net.token_dim) == (3, 16, 24)
    # tokens are the penultimate map, position-major
    assert torch.allclose(tokens[:, 5], penultimate[:, :, 1, 1])
    emb = net.embed(_faces(3))
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    # other input sizes are resized to the configured one
    assert net.forward_features(_faces(2, size=96))[1].shape == (2, 24, 4, 4)
    with pytest.raises(ValueError, match="expects images"):
        net.forward_features(torch.zeros(2, 1, 64, 64))


def test_arc_margin_loss_penalises_the_target_angle() -> None:
    torch.manual_seed(0)
    head = ArcMarginLoss(embed_dim=8, num_classes=5, scale=30.0, margin=0.4)
    emb = torch.randn(16, 8)
    labels = torch.randint(5, (16,))
    plain = head(emb, labels, margin=0.0)
    cos = F.normalize(emb, dim=-1) @ F.normalize(head.weight, dim=-1).t()
    assert plain.item() == pytest.approx(F.cross_entropy(30.0 * cos, labels).item(), rel=1e-5)
    assert head(emb, labels).item() > plain.item()  # the margin makes the target harder
    # an embedding at angle 0.5 from its class centre: the target logit becomes s * cos(0.5 + m)
    w = F.normalize(head.weight.detach(), dim=-1)
    u = F.normalize(torch.randn(8) - (torch.randn(8) @ w[0]) * w[0], dim=-1)
    u = F.normalize(u - (u @ w[0]) * w[0], dim=-1)
    emb = (math.cos(0.5) * w[0] + math.sin(0.5) * u)[None]
    loss = head(emb, torch.tensor([0]))
    others = 30.0 * (emb @ w.t())[0, 1:]
    logits = torch.cat([torch.tensor([30.0 * math.cos(0.5 + 0.4)]), others])
    assert loss.item() == pytest.approx(F.cross_entropy(logits[None], torch.tensor([0])).item(), rel=1e-4)


def test_tiny_clip_hidden_states_and_grayscale_input(tmp_path) -> None:
    cfg = TinyClipConfig(
        width=32, layers=4, heads=2, embed_dim=16, text_width=16, text_layers=1, text_heads=1, hidden_blocks=(1, 2, 3)
    )
    clip = TinyClip(cfg, config_dir=tmp_path).eval()
    assert (tmp_path / f"{clip.registry_name}.json").exists()
    x = _faces(2)
    emb, hidden = clip.encode(x)
    assert emb.shape == (2, 16)
    assert list(hidden) == ["block1", "block2", "block3"]
    for h in hidden.values():
        assert h.shape == (2, clip.num_tokens, 32) == (2, 1 + (64 // cfg.patch_size) ** 2, 32)
    assert not torch.allclose(hidden["block1"], hidden["block2"])
    # the face is seen in grayscale: a colour image and its gray version encode identically
    emb_gray, hidden_gray = clip.encode(to_grayscale(x))
    assert torch.allclose(emb, emb_gray, atol=1e-5)
    assert torch.allclose(hidden["block3"], hidden_gray["block3"], atol=1e-5)
    text = clip.encode_text(["a face with light skin", "a face with dark skin"])
    assert text.shape == (2, 16)
    with pytest.raises(ValueError, match="hidden_blocks"):
        TinyClipConfig(layers=4, hidden_blocks=(4,))


def test_evaluator_band_filters() -> None:
    x = _faces(2)
    low = EvaluatorNet(EvaluatorConfig(band="low", image_size=32, widths=(8, 16, 16)))
    high = EvaluatorNet(EvaluatorConfig(band="high", widths=(8, 16, 16)))
    # the low evaluator cannot see content above its cutoff, the high one cannot see content below it
    from consisid_lab.data.spectral_filters import high_pass, low_pass

    assert torch.allclose(low.filter(x), low.filter(low_pass(x, 0.25)), atol=1e-5)
    assert torch.allclose(high.filter(x), high.filter(high_pass(x, 0.25)), atol=1e-5)
    assert low.filter(x).shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="band="):
        EvaluatorConfig(band="mid")


def test_band_pair_evaluator_cosine_is_the_mean_of_band_cosines() -> None:
    torch.manual_seed(0)
    low = EvaluatorNet(EvaluatorConfig(band="low", image_size=32, widths=(8, 16))).eval()
    high = EvaluatorNet(EvaluatorConfig(band="high", image_size=32, widths=(8, 16))).eval()
    pair = BandPairEvaluator(low, high).eval()
    a, b = _faces(3, seed=1), _faces(3, seed=2)
    cos = (pair.embed(a) * pair.embed(b)).sum(-1)
    expected = 0.5 * ((low.embed(a) * low.embed(b)).sum(-1) + (high.embed(a) * high.embed(b)).sum(-1))
    assert torch.allclose(cos, expected, atol=1e-5)
    assert torch.allclose(pair.embed(a).norm(dim=-1), torch.ones(3), atol=1e-5)
    with pytest.raises(ValueError, match="low and a high"):
        BandPairEvaluator(high, low)


def test_attribute_captions_describe_attributes() -> None:
    from dataclasses import dataclass

    @dataclass
    class Params:
        face_width: float
        hair_colour: tuple[float, float, float]
        marks: list

    population = [Params(w / 10, (w / 10, 0.1, 0.1), [0] * w) for w in range(10)]
    captioner = AttributeCaptioner(population)
    narrow, wide = captioner(population[0]), captioner(population[9])
    assert "narrow face width" in narrow and "wide face width" in wide
    assert "dark cyan hair colour" in narrow and "light reddish hair colour" in wide
    assert "few marks" in narrow and "many marks" in wide


# --- the store (real generator, tiny recipe) ---------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    pytest.importorskip("consisid_lab.data.synthetic")
    from consisid_lab.encoders.store import load_standins
    from consisid_lab.encoders.training import Recipe

    cache = tmp_path_factory.mktemp("standins")
    standins = load_standins(cache, recipe=Recipe.tiny())
    return cache, standins


def test_store_builds_all_networks_with_the_public_interface(tiny_store) -> None:
    cache, s = tiny_store
    assert sorted(s.rebuilt) == sorted(
        ["identity_net", "clip", "evaluator_low", "evaluator_high", "codec", "face_gate"]
    )
    x = _faces(2)
    assert s.identity_net.embed(x).shape == (2, s.identity_net.embed_dim)
    assert s.identity_net.tokens(x).shape == (2, s.identity_net.num_tokens, s.identity_net.token_dim)
    emb, hidden = s.clip.encode(x)
    assert emb.shape == (2, s.clip.embed_dim) and len(hidden) == len(s.clip.config.hidden_blocks)
    for ev, band in ((s.evaluator, "full"), (s.evaluator_low, "low"), (s.evaluator_high, "high")):
        assert ev.band == band and ev.embed(x).shape == (2, ev.embed_dim)
    assert s.evaluator.low is s.evaluator_low and s.evaluator.high is s.evaluator_high
    assert s.face_gate.is_face(x).shape == (2,)
    video = x[:, None].expand(2, 5, *x.shape[1:])  # (B, 4k+1, 3, H, W)
    assert s.codec.decode(s.codec.encode(video)).shape == video.shape
    for name in s.rebuilt:
        # Entries live in their recipe's folder: a tiny build never replaces the default stand-ins.
        info = json.loads((cache / "tiny" / name / "config.json").read_text())
        assert info["recipe"]["name"] == "tiny" and len(info["key"]) == 64
        assert (cache / "tiny" / name / "model.safetensors").stat().st_size > 0
    assert sorted(p.name for p in cache.iterdir() if p.is_dir()) == ["tiny"]


def test_store_round_trip_loads_identical_weights(tiny_store) -> None:
    from consisid_lab.encoders.store import load_standins
    from consisid_lab.encoders.training import Recipe

    cache, built = tiny_store
    loaded = load_standins(cache, recipe=Recipe.tiny(), build_if_missing=False)
    assert loaded.rebuilt == [] and loaded.build_seconds == 0.0
    x = _faces(2)
    with torch.no_grad():
        assert torch.equal(built.identity_net.embed(x), loaded.identity_net.embed(x))
        assert torch.equal(built.evaluator_high.embed(x), loaded.evaluator_high.embed(x))
        for a, b in zip(built.clip.encode(x)[1].values(), loaded.clip.encode(x)[1].values()):
            assert torch.equal(a, b)


def test_loading_the_store_leaves_the_global_rng_alone(tiny_store) -> None:
    # A run that loads the stand-ins must initialise its model as one that builds them (exact resume).
    from consisid_lab.encoders.store import load_standins
    from consisid_lab.encoders.training import Recipe

    cache, _ = tiny_store
    state = torch.get_rng_state()
    load_standins(cache, recipe=Recipe.tiny(), build_if_missing=False)
    assert torch.equal(torch.get_rng_state(), state)


def test_store_rebuilds_stale_and_corrupt_entries(tiny_store, caplog) -> None:
    from consisid_lab.encoders.store import load_standins
    from consisid_lab.encoders.training import Recipe

    cache, _ = tiny_store
    config = cache / "tiny" / "evaluator_low" / "config.json"
    info = json.loads(config.read_text())
    info["key"] = "0" * 64  # as if trained with another generator config / recipe
    config.write_text(json.dumps(info))
    weights = cache / "tiny" / "evaluator_high" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-16] + b"\0" * 16)  # corrupt the tail of the weights
    with caplog.at_level(logging.WARNING, logger="consisid_lab.encoders.store"):
        s = load_standins(cache, recipe=Recipe.tiny())
    assert sorted(s.rebuilt) == ["evaluator_high", "evaluator_low"]
    assert "stale" in caplog.text and "corrupt" in caplog.text
    again = load_standins(cache, recipe=Recipe.tiny(), build_if_missing=False)
    assert again.rebuilt == []


def test_store_refuses_to_build_when_told_not_to(tmp_path) -> None:
    pytest.importorskip("consisid_lab.data.synthetic")
    from consisid_lab.encoders.store import load_standins
    from consisid_lab.encoders.training import Recipe

    with pytest.raises(FileNotFoundError, match="build_if_missing=False"):
        load_standins(tmp_path, recipe=Recipe.tiny(), build_if_missing=False)


def test_store_refuses_an_unresolved_portable_cache_path(tmp_path, monkeypatch) -> None:
    from consisid_lab.encoders.store import load_standins
    from consisid_lab.encoders.training import Recipe
    from consisid_lab.utils.checkpoints import CACHE_MARKER

    # A stored run config instantiated without localised_config: nothing may be built under the marker's name.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="localised_config"):
        load_standins(f"{CACHE_MARKER}/standins", recipe=Recipe.tiny())
    assert list(tmp_path.iterdir()) == []


def test_band_mixed_pool_repairs_low_and_high_parts_per_video() -> None:
    pytest.importorskip("consisid_lab.data.synthetic")
    from consisid_lab.data.synthetic import SyntheticConfig
    from consisid_lab.encoders.training import Recipe, render_pool

    recipe = Recipe(evaluator_identities=6, videos_per_identity=3, frames_per_video=1, render_workers=1)
    pool = render_pool(SyntheticConfig(), "evaluator", 6, recipe, kind="band_mixed")
    assert pool.images.shape == (6 * 3 * 2, 3, 64, 64) and pool.images.dtype == torch.uint8
    per_video = 2  # one frame + the reference
    low = pool.labels.view(6, 3, per_video)
    high = pool.high_labels.view(6, 3, per_video)
    assert torch.equal(low[:, :, 0], torch.arange(6)[:, None].expand(6, 3))
    assert torch.equal(high[:, 0, 0], torch.arange(6))  # the first video keeps the identity's own high part
    for v in (1, 2):  # later videos re-pair: every high part used once, most not with their own low part
        assert sorted(high[:, v, 0].tolist()) == list(range(6))
    assert (high[:, 1:, 0] != low[:, 1:, 0]).any()
    assert torch.equal(pool.labels[pool.ref_index], low[:, :, 1].flatten())
