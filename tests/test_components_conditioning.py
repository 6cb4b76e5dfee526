"""Conditioning components (codecs, text encoders, keypoint renderer, global encoder) and the diffusion objective /
sampler: tiny sizes, CPU, offline."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys

import pytest
import torch

from consisid_lab.models.diffusion import (
    add_noise,
    alphas_cumprod_at,
    diffusion_loss,
    dynamic_guidance_scale,
    make_scheduler,
    sample,
    sample_timesteps,
    v_target,
    v_to_x0,
    weighted_x0_loss,
)
from consisid_lab.models.global_encoder import FACE_FRAME, KPS_FRAME, FaceLatentEncoder, NoGlobalEncoder
from consisid_lab.models.keypoints import (
    FIVE_POINT_COLORS,
    LEFT_EYE,
    NOSE,
    RIGHT_MOUTH,
    FivePointRenderer,
    NoKeypointRenderer,
)
from consisid_lab.models.text_encoder import BagOfWordsTextEncoder, T5TextEncoder
from consisid_lab.models.vae import CogVideoXCodec, PixelCodec
from consisid_lab.types import IdentityFeatures


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    # Anything that tries to reach the Hub fails loudly instead of downloading.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


# ----------------------------------------------------------------------------------------------------- codecs


def test_pixel_codec_round_trip_is_exact_and_shapes_follow_the_factor():
    codec = PixelCodec(spatial_factor=4, scaling_factor=0.5)
    video = torch.rand(2, 3, 3, 16, 24) * 2 - 1
    z = codec.encode(video)
    assert z.shape == (2, 3, 48, 4, 6) == (2, *codec.latent_shape(3, 16, 24))
    assert torch.equal(codec.decode(z), video)
    # Each latent channel is one pixel of the patch, scaled: the top-left pixel of patch (0, 0) is channel 0.
    assert z[0, 0, 0, 0, 0] == pytest.approx(0.5 * video[0, 0, 0, 0, 0].item())
    img = video[:, 0]
    assert torch.equal(codec.encode_image(img), z[:, :1])


def test_pixel_codec_rejects_sizes_it_cannot_tile():
    codec = PixelCodec(spatial_factor=4)
    with pytest.raises(ValueError, match="multiple of 4.*got 18"):
        codec.encode(torch.zeros(1, 1, 3, 18, 16))
    with pytest.raises(ValueError, match="width"):
        codec.latent_shape(1, 16, 2)


def _tiny_cogvideox_vae(path):
    from diffusers import AutoencoderKLCogVideoX

    torch.manual_seed(0)
    vae = AutoencoderKLCogVideoX(
        down_block_types=("CogVideoXDownBlock3D",) * 3,
        up_block_types=("CogVideoXUpBlock3D",) * 3,
        block_out_channels=(8, 8, 8),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=4,
        temporal_compression_ratio=4,
        sample_height=16,
        sample_width=16,
        scaling_factor=0.7,
    )
    vae.save_pretrained(path / "vae")
    return vae


def test_cogvideox_codec_loads_a_local_vae_and_matches_it(tmp_path):
    vae = _tiny_cogvideox_vae(tmp_path)
    codec = CogVideoXCodec(str(tmp_path), subfolder="vae")
    assert (codec.latent_channels, codec.spatial_factor, codec.temporal_factor) == (4, 4, 4)
    assert codec.scaling_factor == pytest.approx(0.7)
    assert not any(p.requires_grad for p in codec.parameters())
    codec.train()
    assert not codec.vae.training

    video = torch.rand(2, 9, 3, 16, 16) * 2 - 1  # 9 = 4*2+1 frames -> 3 latent frames
    z = codec.encode(video)
    assert z.shape == (2, 3, 4, 4, 4) == (2, *codec.latent_shape(9, 16, 16))
    with torch.no_grad():
        ref = vae.encode(video.permute(0, 2, 1, 3, 4)).latent_dist.mode().permute(0, 2, 1, 3, 4) * 0.7
    torch.testing.assert_close(z, ref)
    assert codec.decode(z).shape == video.shape
    assert codec.encode_image(video[:, 0]).shape == (2, 1, 4, 4, 4)


def test_cogvideox_codec_errors_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "vae")):
        CogVideoXCodec(str(tmp_path), subfolder="vae")
    _tiny_cogvideox_vae(tmp_path)
    codec = CogVideoXCodec(str(tmp_path), subfolder="vae")
    with pytest.raises(ValueError, match=r"8k\+1.*1, 9, 17.*got 5"):
        codec.encode(torch.zeros(1, 5, 3, 16, 16))
    with pytest.raises(ValueError, match="height.*multiple of 4"):
        codec.check_size(9, 10, 16)


# ----------------------------------------------------------------------------------------------- text encoders

_TOKENIZE_SNIPPET = """
import json, sys
from consisid_lab.models.text_encoder import BagOfWordsTextEncoder
enc = BagOfWordsTextEncoder(dim=8, max_length=12, vocab_size=4096, num_heads=2)
ids, _ = enc.tokenize(json.loads(sys.argv[1]))
print(json.dumps([ids.tolist(), hash("woman")]))
"""


def test_bag_of_words_ids_are_stable_across_processes():
    captions = ["A woman turns her head, smiling.", "a man blinks under warm light"]
    seed = "4242" if os.environ.get("PYTHONHASHSEED") != "4242" else "4343"
    out = subprocess.run(
        [sys.executable, "-c", _TOKENIZE_SNIPPET, json.dumps(captions)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": seed},
    )
    ids_there, salted_hash_there = json.loads(out.stdout)
    assert salted_hash_there != hash("woman")  # the other process really hashes strings differently
    here, _ = BagOfWordsTextEncoder(dim=8, max_length=12, num_heads=2).tokenize(captions)
    assert ids_there == here.tolist()
    # Case and punctuation do not matter; word order does.
    ids, _ = BagOfWordsTextEncoder(dim=8, max_length=12, num_heads=2).tokenize(["WOMAN, turns", "turns woman"])
    assert ids[0, :2].tolist() == ids[1, :2].flip(0).tolist() != ids[1, :2].tolist()


def test_bag_of_words_drops_stop_words_so_every_benchmark_caption_fits():
    import re
    from pathlib import Path

    from omegaconf import OmegaConf

    from consisid_lab.data.synthetic import SyntheticConfig, caption_for, sample_motion

    enc = BagOfWordsTextEncoder(dim=8, max_length=4, num_heads=2, stop_words=["A", "the"])
    ids, valid = enc.tokenize(["A man and the dog", "man and dog"])
    assert ids[0].tolist() == ids[1].tolist() and valid[0].sum() == 3
    # The default config's list and length keep every content word of the benchmark's captions (none truncated).
    cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf/model/text_encoder/bow.yaml")
    stop = list(cfg.stop_words)
    enc = BagOfWordsTextEncoder(dim=8, max_length=cfg.max_length, num_heads=2, stop_words=stop)
    captions = [caption_for(sample_motion(SyntheticConfig(), 1000 + i)) for i in range(300)]
    content = torch.tensor([len([w for w in re.findall("[a-z]+", c.lower()) if w not in stop]) for c in captions])
    words = torch.tensor([len(re.findall("[a-z]+", c.lower())) for c in captions])
    assert torch.equal(enc.tokenize(captions)[1].sum(1), content)
    assert int(content.max()) <= cfg.max_length < int(words.max())
    # The background colour is the third kept word of every caption.
    ids = enc.tokenize(["In front of a plain teal background, a person smiles"])[0]
    assert ids[0, 2] == enc.tokenize(["teal"])[0][0, 0]


def test_bag_of_words_outputs_differ_by_caption_and_pad_with_zeros():
    torch.manual_seed(0)
    enc = BagOfWordsTextEncoder(dim=16, max_length=6, num_heads=2)
    out = enc(["a woman smiles", "a man frowns", "a woman smiles", ""])
    assert out.shape == (4, 6, 16) and torch.isfinite(out).all()
    assert not torch.allclose(out[0], out[1])
    torch.testing.assert_close(out[0], out[2])
    assert out[0, 3:].abs().max() == 0 and out[3].abs().max() == 0
    out.sum().backward()
    assert enc.embed.weight.grad is not None and enc.embed.weight.grad.abs().sum() > 0


def _tiny_t5(path):
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    words = ["a", "person", "smiles", "at", "the", "camera", "walks", "in", "park"]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)] + [("\u2581" + w, -1.0) for w in words]
    T5Tokenizer(vocab=vocab, extra_ids=0).save_pretrained(path / "tokenizer")
    torch.manual_seed(0)
    cfg = T5Config(
        vocab_size=len(vocab), d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2, relative_attention_num_buckets=8
    )
    model = T5EncoderModel(cfg)
    model.save_pretrained(path / "text_encoder")
    return model


def test_t5_encoder_loads_offline_and_warns_with_the_dropped_count(tmp_path, caplog):
    model = _tiny_t5(tmp_path)
    enc = T5TextEncoder(str(tmp_path), max_length=5)
    assert enc.dim == 16 and not any(p.requires_grad for p in enc.parameters())
    captions = ["a person smiles at the camera in the park", "park"]  # 9 words + </s> = 10 tokens
    with caplog.at_level(logging.WARNING, logger="consisid_lab.models.text_encoder"):
        out = enc(captions)
    assert out.shape == (2, 5, 16)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "caption 0" in messages[0] and "dropped 5 tokens" in messages[0]
    ids = enc.tokenize(captions)
    assert ids[1].tolist() == [12, 1, 0, 0, 0]  # "park", </s>, padding
    with torch.no_grad():
        torch.testing.assert_close(out, model.eval()(ids)[0])


def test_t5_encoder_missing_folder_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        T5TextEncoder(str(tmp_path / "nowhere"))


# ----------------------------------------------------------------------------------------------------- keypoints


def _kps(b=1):
    pts = torch.tensor([[20.0, 24.0], [44.0, 24.0], [32.0, 36.0], [22.0, 48.0], [42.0, 48.0]])
    return pts.expand(b, 5, 2).clone()


def test_five_point_renderer_lights_the_points_in_their_colours_and_leaves_the_rest_black():
    render = FivePointRenderer(radius=0.04, thickness=0.03)
    image = torch.zeros(2, 3, 64, 64)
    kps = _kps(2)
    kps[1] += 5.0
    out = render(image, kps)
    assert out.shape == (2, 3, 64, 64) and out.min() >= -1 and out.max() <= 1
    for b in range(2):
        for i, (x, y) in enumerate(kps[b].round().long().tolist()):
            expected = torch.tensor(FIVE_POINT_COLORS[i]) * 2 - 1
            torch.testing.assert_close(out[b, :, y, x], expected)
        # Corners are far from every mark.
        assert (out[b, :, :4, :4] == -1).all() and (out[b, :, -4:, -4:] == -1).all()
    # The limb between the left eye and the nose is lit at its midpoint, dimmer than the points.
    mid = ((kps[0, LEFT_EYE] + kps[0, NOSE]) / 2).round().long().tolist()
    red = out[0, 0, mid[1], mid[0]]
    assert -1 < red < 1
    # The second sample is the first moved by (5, 5) pixels.
    torch.testing.assert_close(out[1, :, 5:, 5:], out[0, :, :-5, :-5])


def test_five_point_renderer_scales_with_image_size_and_is_anti_aliased():
    render = FivePointRenderer(radius=0.05, thickness=0.01)
    small = render(torch.zeros(1, 3, 64, 64), _kps())
    big = render(torch.zeros(1, 3, 128, 128), _kps() * 2)
    lit_small = (small > -1).any(1).sum().item()
    lit_big = (big > -1).any(1).sum().item()
    assert 3.0 < lit_big / lit_small < 5.0  # area grows with the square of the side
    values = small[0, 0].unique()
    assert ((values > -1) & (values < 1)).any()  # partial coverage at stroke edges
    x, y = _kps()[0, RIGHT_MOUTH].long().tolist()
    assert (big[0, :, 2 * y, 2 * x] > -1).any() and NoKeypointRenderer()(small, _kps()) is None


# ------------------------------------------------------------------------------------------------ global encoder


def test_face_latent_encoder_places_face_and_keypoint_latents():
    codec = PixelCodec(spatial_factor=4)
    face = torch.rand(2, 3, 16, 16) * 2 - 1
    kps_image = torch.rand(2, 3, 16, 16) * 2 - 1
    enc = FaceLatentEncoder(use_kps=False)
    out = enc(face, None, codec, num_latent_frames=4)
    assert enc.channels(codec) == codec.latent_channels == out.shape[2]
    assert out.shape == (2, 4, 48, 4, 4)
    torch.testing.assert_close(out[:, FACE_FRAME], codec.encode_image(face)[:, 0])
    assert out[:, 1:].abs().max() == 0

    out = FaceLatentEncoder(use_kps=True)(face, kps_image, codec, num_latent_frames=3)
    torch.testing.assert_close(out[:, FACE_FRAME], codec.encode_image(face)[:, 0])
    torch.testing.assert_close(out[:, KPS_FRAME], codec.encode_image(kps_image)[:, 0])
    assert out[:, 2:].abs().max() == 0

    none = NoGlobalEncoder()
    assert none.channels(codec) == 0 and none(face, kps_image, codec, 4) is None


def test_face_latent_encoder_can_give_every_latent_frame_the_reference():
    codec = PixelCodec(spatial_factor=4)
    face = torch.rand(2, 3, 16, 16) * 2 - 1
    out = FaceLatentEncoder(use_kps=False, face_frames="all")(face, None, codec, num_latent_frames=3)
    for frame in range(3):
        torch.testing.assert_close(out[:, frame], codec.encode_image(face)[:, 0])
    with pytest.raises(ValueError, match="face_frames=all.*use_kps=false"):
        FaceLatentEncoder(use_kps=True, face_frames="all")
    with pytest.raises(ValueError, match="'first'.*'all', got 'every'"):
        FaceLatentEncoder(face_frames="every")


def test_face_latent_encoder_errors_name_the_settings():
    codec = PixelCodec(spatial_factor=4)
    face = torch.zeros(1, 3, 16, 16)
    with pytest.raises(ValueError, match="model/keypoint_renderer.*use_kps|use_kps.*model/keypoint_renderer"):
        FaceLatentEncoder(use_kps=True)(face, None, codec, 4)
    with pytest.raises(ValueError, match="use_kps=True needs at least 2 latent frames, got 1"):
        FaceLatentEncoder(use_kps=True)(face, face, codec, 1)


# ----------------------------------------------------------------------------------------------------- objective


def test_make_scheduler_uses_zero_terminal_snr_and_rejects_unknown_settings():
    base, shifted = make_scheduler(), make_scheduler(snr_shift_scale=3.0)
    assert base.alphas_cumprod[-1] == 0 and shifted.alphas_cumprod[-1] == 0
    assert (shifted.alphas_cumprod[1:-1] < base.alphas_cumprod[1:-1]).all()  # the shift lowers the SNR
    t = sample_timesteps(base, 64, generator=torch.Generator().manual_seed(0))
    assert t.shape == (64,) and t.min() >= 0 and t.max() < 1000 and t.unique().numel() > 32
    with pytest.raises(ValueError, match="snr_shift"):
        make_scheduler(snr_shift=3.0)


def test_high_noise_bias_moves_training_timesteps_up_and_one_keeps_them_uniform():
    scheduler = make_scheduler()
    uniform = sample_timesteps(scheduler, 4096, generator=torch.Generator().manual_seed(0))
    same = torch.randint(0, 1000, (4096,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(uniform, same), "the uniform default draws exactly what it always drew (exact resume)"
    biased = sample_timesteps(scheduler, 4096, generator=torch.Generator().manual_seed(0), high_noise_bias=2.0)
    assert biased.min() >= 0 and biased.max() < 1000
    assert biased.float().mean() == pytest.approx(1000 * 2 / 3, rel=0.03)  # E[u^(1/2)] = 2/3
    with pytest.raises(ValueError, match="high_noise_bias"):
        sample_timesteps(scheduler, 4, high_noise_bias=0.0)


def test_weighted_x0_loss_equals_the_v_prediction_mse():
    scheduler = make_scheduler()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 2, 3, 4, 4, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([0, 250, 700, 999])
    v_pred = torch.randn(x0.shape, generator=g)

    out = diffusion_loss(lambda x, tt, c: v_pred, x0, {}, scheduler, t, noise)
    v_mse = (v_pred - v_target(scheduler, x0, noise, t)).square().flatten(1).mean(1)
    torch.testing.assert_close(out.loss, v_mse, rtol=1e-5, atol=1e-6)
    # The identities the loss relies on: x_t and v recover x0 exactly.
    x_t = add_noise(scheduler, x0, noise, t)
    torch.testing.assert_close(v_to_x0(scheduler, x_t, v_target(scheduler, x0, noise, t), t), x0, atol=1e-5, rtol=0)
    # Matches diffusers' own noising and velocity.
    torch.testing.assert_close(x_t, scheduler.add_noise(x0, noise, t).float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v_target(scheduler, x0, noise, t), scheduler.get_velocity(x0, noise, t).float())


def test_masked_loss_averages_over_the_mask_and_guards_empty_masks():
    a = torch.tensor([0.5, 0.5])
    x0 = torch.zeros(2, 1, 2, 2, 2)
    x0_pred = torch.zeros_like(x0)
    x0_pred[:, :, :, 0, 0] = 2.0  # error 4 at one pixel (both channels)
    mask = torch.zeros(2, 1, 1, 2, 2)
    mask[0, :, :, 0, 0] = 1  # sample 0: the mask covers exactly the wrong pixel
    loss = weighted_x0_loss(x0_pred, x0, a, mask)
    torch.testing.assert_close(loss[0], torch.tensor(4.0 / 0.5))
    # Sample 1 has an empty mask: falls back to the full mean (4 at 1 of 4 pixels).
    torch.testing.assert_close(loss[1], torch.tensor(1.0 / 0.5))
    torch.testing.assert_close(weighted_x0_loss(x0_pred, x0, a), torch.tensor([2.0, 2.0]))


def test_weight_cap_caps_the_v_loss_weight_of_nearly_clean_timesteps_only():
    a = torch.tensor([0.0, 0.5, 0.95, 0.999])  # weights 1 / (1 - a): 1, 2, 20, 1000
    x0 = torch.zeros(4, 1, 1, 2, 2)
    x0_pred = torch.ones_like(x0)  # x0 error 1 everywhere
    exact = weighted_x0_loss(x0_pred, x0, a)
    torch.testing.assert_close(exact, torch.tensor([1.0, 2.0, 20.0, 1000.0]), rtol=1e-4, atol=0)
    capped = weighted_x0_loss(x0_pred, x0, a, weight_cap=6.0)
    torch.testing.assert_close(capped, torch.tensor([1.0, 2.0, 6.0, 6.0]), rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="weight_cap"):
        weighted_x0_loss(x0_pred, x0, a, weight_cap=0.5)


def test_adaln_zero_init_starts_every_block_as_the_identity_and_predicts_zero():
    from consisid_lab.models.backbone import VideoDiT

    torch.manual_seed(0)
    x, text, t = torch.randn(2, 3, 32, 8, 8), torch.randn(2, 16, 32), torch.tensor([10, 900])
    zero = VideoDiT(init="adaln_zero")
    assert zero(x, text, t).abs().max() == 0
    block = zero.blocks[0]
    tokens = torch.randn(2, 48, zero.inner_dim)
    out, _ = block(tokens, torch.randn(2, 16, zero.inner_dim), torch.randn(2, zero.config["time_embed_dim"]))
    torch.testing.assert_close(out, tokens)  # gates 0: the residual stream passes through
    assert VideoDiT()(x, text, t).abs().max() > 0  # diffusers' initialisation does not
    with pytest.raises(ValueError, match="adaln_zero"):
        VideoDiT(init="zeros")


def test_pooled_text_route_starts_silent_ignores_padding_and_then_carries_the_caption():
    from consisid_lab.models.backbone import VideoDiT, pool_text

    torch.manual_seed(0)
    text = torch.randn(2, 16, 32)
    text[:, 10:] = 0  # padding tokens are zeros
    torch.testing.assert_close(pool_text(text), text[:, :10].mean(dim=1))
    assert pool_text(torch.zeros(1, 4, 32)).abs().max() == 0  # an empty caption pools to zeros
    plain = VideoDiT()
    pooled = VideoDiT(pooled_text=True)
    pooled.transformer.load_state_dict(plain.transformer.state_dict())
    x, t = torch.randn(2, 3, 32, 8, 8), torch.tensor([10, 900])
    torch.testing.assert_close(pooled(x, text, t), plain(x, text, t))  # zero-initialised: no change at first
    torch.nn.init.normal_(pooled.pooled_text_proj.weight, std=0.5)
    other = text.clone()
    other[:, :10] = torch.randn(2, 10, 32)
    gap_plain = (plain(x, other, t) - plain(x, text, t)).abs().mean()
    gap_pooled = (pooled(x, other, t) - pooled(x, text, t)).abs().mean()
    assert gap_pooled > 10 * gap_plain  # the caption now modulates every block, not only through attention


# ------------------------------------------------------------------------------------------------------- sampler


def _oracle(scheduler, x0):
    """The exact v for a known x0 at any (x_t, t)."""

    def model_fn(x_t, t, cond):
        a = alphas_cumprod_at(scheduler, t).reshape(-1, 1, 1, 1, 1)
        eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
        return a.sqrt() * eps - (1 - a).sqrt() * x0

    return model_fn


@pytest.mark.parametrize("num_steps", [1, 4, 25])
def test_sampler_with_an_oracle_recovers_x0(num_steps):
    scheduler = make_scheduler(snr_shift_scale=3.0)
    x0 = torch.randn(2, 3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    seen = []
    oracle = _oracle(scheduler, x0)

    def model_fn(x_t, t, cond):
        seen.append(int(t[0]))
        return oracle(x_t, t, cond)

    out = sample(model_fn, x0.shape, scheduler, num_steps, cond={}, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=0)
    assert out.dtype == torch.float32
    assert len(seen) == num_steps and seen[0] == 999 and seen == sorted(seen, reverse=True)


def _linear_model(weight):
    # A fixed, non-trivial v model whose output depends on x_t, t and the condition.
    def model_fn(x_t, t, cond):
        shift = cond["shift"] + cond["identity"].vectors["arcface"].mean(1)
        return weight * x_t + shift.reshape(-1, 1, 1, 1, 1) + t.float().reshape(-1, 1, 1, 1, 1) / 1000

    return model_fn


def test_guidance_one_equals_no_guidance_and_batching_matches_two_calls():
    scheduler = make_scheduler()
    model_fn = _linear_model(0.3)
    cond = {"shift": torch.tensor([0.5, -0.2]), "identity": IdentityFeatures(vectors={"arcface": torch.ones(2, 3)})}
    uncond = {"shift": torch.tensor([-1.0, 1.0]), "identity": IdentityFeatures(vectors={"arcface": torch.zeros(2, 3)})}
    shape = (2, 2, 3, 4, 4)

    def run(**kw):
        return sample(model_fn, shape, scheduler, 6, generator=torch.Generator().manual_seed(3), **kw)

    plain = run(cond=cond)
    torch.testing.assert_close(run(cond=cond, uncond=uncond, guidance_scale=1.0), plain, atol=1e-5, rtol=1e-5)
    guided = run(cond=cond, uncond=uncond, guidance_scale=4.0)
    assert (guided - plain).abs().max() > 1e-2
    torch.testing.assert_close(
        run(cond=cond, uncond=uncond, guidance_scale=4.0, cfg_batching=True), guided, atol=1e-5, rtol=1e-5
    )
    assert (run(cond=cond, uncond=uncond, guidance_scale=4.0, use_dynamic_cfg=True) - guided).abs().max() > 1e-3
    dtypes = set()

    def recording(x_t, t, c):
        dtypes.add(x_t.dtype)
        return model_fn(x_t, t, c).to(x_t.dtype)

    low = sample(
        recording, shape, scheduler, 6, cond=cond, generator=torch.Generator().manual_seed(3), dtype=torch.bfloat16
    )
    assert dtypes == {torch.bfloat16} and low.dtype == torch.float32
    torch.testing.assert_close(low, plain, atol=0.1, rtol=0.05)
    with pytest.raises(ValueError, match="guidance_scale=4.0.*uncond"):
        run(cond=cond, guidance_scale=4.0)


def test_dynamic_guidance_follows_the_cogvideox_formula():
    n = 50
    for t in (999, 500, 41, 0):
        expected = 1 + 6.0 * (1 - math.cos(math.pi * ((n - t) / n) ** 5.0)) / 2
        assert dynamic_guidance_scale(6.0, t, n) == pytest.approx(expected)
    assert dynamic_guidance_scale(6.0, n, n) == pytest.approx(1.0)
    assert dynamic_guidance_scale(6.0, 0, n) == pytest.approx(7.0)
