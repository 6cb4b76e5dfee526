"""Our ConsisID composition equals diffusers' ConsisIDTransformer3DModel, weight for weight."""

from __future__ import annotations

import pytest
import torch
from diffusers import ConsisIDTransformer3DModel

from consisid_lab.models.consisid import (
    consisid_forward,
    diffusers_to_ours,
    from_diffusers,
    ours_to_diffusers,
    to_diffusers_state_dict,
)
from consisid_lab.models.denoiser import IdentityDenoiser
from consisid_lab.models.fuser import PerceiverFuser
from consisid_lab.models.injector import CrossAttentionInjector

TOL = 1e-5
B, F, H, W, L = 2, 3, 8, 8, 7
ID_DIM, VIT_DIM, NUM_SCALE = 10, 16, 2


def _config(
    *, is_kps: bool = False, interval: int = 2, in_channels: int = 8, rotary: bool = True, learned: bool = True
) -> dict:
    heads, head_dim = 3, 16  # inner 48 -> ConsisID's identity-token width 48 * 2 / 3 = 32
    return {
        "num_attention_heads": heads,
        "attention_head_dim": head_dim,
        "in_channels": in_channels,
        "out_channels": 4,
        "time_embed_dim": 16,
        "text_embed_dim": 12,
        "num_layers": 2 * interval,
        "sample_width": W,
        "sample_height": H,
        "sample_frames": (F - 1) * 4 + 1,
        "patch_size": 2,
        "max_text_seq_length": L,
        "use_rotary_positional_embeddings": rotary,
        "use_learned_positional_embeddings": learned,
        "is_train_face": True,
        "is_kps": is_kps,
        "cross_attn_interval": interval,
        "cross_attn_dim_head": 8,
        "cross_attn_num_heads": 2,
        "LFE_id_dim": ID_DIM,
        "LFE_vit_dim": VIT_DIM,
        "LFE_depth": 4,
        "LFE_dim_head": 8,
        "LFE_num_heads": 2,
        "LFE_num_id_token": 3,
        "LFE_num_querie": 4,
        "LFE_output_dim": heads * head_dim * 2 // 3,
        "LFE_ff_mult": 2,
        "LFE_num_scale": NUM_SCALE,
        "local_face_scale": 0.7,
    }


def _reference(config: dict, seed: int = 0) -> ConsisIDTransformer3DModel:
    torch.manual_seed(seed)
    model = ConsisIDTransformer3DModel(**config).eval()
    # Randomise every parameter, including the ones diffusers initialises to zero (adaLN, biases), so that no
    # path is vacuously equal.
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model


def _inputs(config: dict, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(B, F, config["in_channels"], H, W, generator=g),
        "encoder_hidden_states": torch.randn(B, L, config["text_embed_dim"], generator=g),
        "timestep": torch.tensor([17, 803]),
        "id_cond": torch.randn(B, ID_DIM, generator=g),
        "id_vit_hidden": [torch.randn(B, 5 + k, VIT_DIM, generator=g) for k in range(NUM_SCALE)],
    }


def _rotary(model: IdentityDenoiser, config: dict):
    return model.backbone.rotary_embedding(F, H, W) if config["use_rotary_positional_embeddings"] else None


@pytest.mark.parametrize("interval", [2, 3])
@pytest.mark.parametrize(("is_kps", "in_channels"), [(False, 8), (True, 12)])
def test_from_diffusers_matches_reference(interval: int, is_kps: bool, in_channels: int) -> None:
    config = _config(is_kps=is_kps, interval=interval, in_channels=in_channels)
    ref = _reference(config)
    ours = from_diffusers(ref).eval()

    assert isinstance(ours.fuser, PerceiverFuser)
    assert isinstance(ours.backbone.injector, CrossAttentionInjector)
    assert ours.backbone.injector.position == "after_block" and ours.backbone.injector.interval == interval
    assert ours.backbone.in_channels == in_channels and ours.global_encoder.use_kps is is_kps

    x = _inputs(config)
    rot = _rotary(ours, config)
    assert rot is not None
    with torch.no_grad():
        expected = ref(**x, image_rotary_emb=rot).sample
        got = consisid_forward(ours, **x)
        # Not vacuous: the identity route moves the reference output.
        other = dict(x, id_cond=torch.randn_like(x["id_cond"]))
        moved = ref(**other, image_rotary_emb=rot).sample
    assert got.shape == (B, F, config["out_channels"], H, W)
    assert (moved - expected).abs().max() > 1e-3
    torch.testing.assert_close(got, expected, atol=TOL, rtol=0)


def test_from_diffusers_without_rotary_takes_the_sincos_buffer() -> None:
    config = _config(rotary=False, learned=False)
    ref = _reference(config)
    ours = from_diffusers(ref).eval()
    x = _inputs(config)
    buf = ours.backbone.transformer.patch_embed.pos_embedding
    assert not buf.is_meta
    with torch.no_grad():
        torch.testing.assert_close(consisid_forward(ours, **x), ref(**x).sample, atol=TOL, rtol=0)


def test_state_dict_round_trip() -> None:
    config = _config(interval=3)
    ref = _reference(config)
    ours = from_diffusers(ref).eval()
    sd = to_diffusers_state_dict(ours)
    assert set(sd) == set(ref.state_dict())

    fresh = _reference(config, seed=5)  # different weights, then overwritten strictly
    fresh.load_state_dict(sd, strict=True)
    for k, v in ref.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    x = _inputs(config)
    rot = _rotary(ours, config)
    with torch.no_grad():
        torch.testing.assert_close(fresh(**x, image_rotary_emb=rot).sample, consisid_forward(ours, **x))
    for k in ref.state_dict():
        assert ours_to_diffusers(diffusers_to_ours(k)) == k


def test_key_map_misses_raise() -> None:
    ref = _reference(_config())
    with pytest.raises(KeyError, match="no diffusers->ours key rule"):
        diffusers_to_ours("local_facial_extractor.unknown.weight")

    def drops_a_rule(key: str) -> str:
        if key.startswith("local_facial_extractor.mapping_1"):
            raise KeyError(f"unmapped {key}")
        return diffusers_to_ours(key)

    with pytest.raises(KeyError, match="unmapped"):
        from_diffusers(ref, key_map=drops_a_rule)

    def misnames(key: str) -> str:
        out = diffusers_to_ours(key)
        return out.replace("fuser.queries", "fuser.latents")

    with pytest.raises(RuntimeError, match="fuser.queries"):  # strict load: a missing and an unexpected key
        from_diffusers(ref, key_map=misnames)

    def collides(key: str) -> str:
        out = diffusers_to_ours(key)
        return "fuser.queries" if out == "fuser.proj_out" else out

    with pytest.raises(ValueError, match="two diffusers keys"):
        from_diffusers(ref, key_map=collides)


def test_layer_count_not_divisible_by_interval_is_refused() -> None:
    config = dict(_config(interval=3), num_layers=4)  # ConsisID: 1 module, injections at blocks 0 and 3
    with pytest.raises(ValueError, match="divisible"):
        from_diffusers(ConsisIDTransformer3DModel(**config))


@pytest.mark.parametrize(("h", "w"), [(H, W), (8, 12), (12, 6)])
def test_rotary_embedding_matches_the_consisid_pipeline(h: int, w: int) -> None:
    from types import SimpleNamespace

    from diffusers import ConsisIDPipeline

    ours = from_diffusers(_reference(_config()))
    vae_scale = 8  # the pipeline works in pixels; our helper in latent cells
    pipe = SimpleNamespace(vae_scale_factor_spatial=vae_scale, transformer=SimpleNamespace(config=_Cfg(_config())))
    expected = ConsisIDPipeline._prepare_rotary_positional_embeddings(pipe, h * vae_scale, w * vae_scale, F, "cpu")
    got = ours.backbone.rotary_embedding(F, h, w)
    for a, b in zip(got, expected):
        assert a.shape == (F * (h // 2) * (w // 2), 16)
        assert torch.equal(a, b)


class _Cfg(dict):
    __getattr__ = dict.__getitem__
