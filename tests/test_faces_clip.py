"""EVA-CLIP through open_clip: EVA-CLIP-layout checkpoints convert and load strictly; hidden states and inputs."""

from __future__ import annotations

import json

import pytest
import torch

open_clip = pytest.importorskip("open_clip")
timm = pytest.importorskip("timm")

from consisid_lab.faces.eva_clip import (  # noqa: E402
    EvaClipEncoder,
    eva_clip_to_open_clip,
    open_clip_to_eva_clip,
)

TINY_TIMM = "consisid_test_tiny_eva02_clip"
TINY_CLIP = "consisid-test-tiny-EVA02"
DEPTH, WIDTH, PROJ, IMAGE = 4, 32, 16, 42  # 3x3 patches of 14, rope interpolated from a 2x2 reference grid


def _tiny_eva(pretrained: bool = False, **kwargs):
    """EVA02-CLIP-L-14-336's block design (separate q/k/v, SwiGLU with sub-LN, inner attention LN, rope), tiny."""
    from timm.models.eva import Eva

    args = dict(
        img_size=IMAGE,
        patch_size=14,
        embed_dim=WIDTH,
        depth=DEPTH,
        num_heads=2,
        mlp_ratio=4 * 2 / 3,
        qkv_fused=False,
        swiglu_mlp=True,
        scale_mlp=True,
        scale_attn_inner=True,
        use_rot_pos_emb=True,
        ref_feat_shape=(2, 2),
    )
    for k in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # timm.create_model's loader arguments
        kwargs.pop(k, None)
    return Eva(**{**args, **kwargs})


@pytest.fixture(scope="module")
def tiny_name(tmp_path_factory):
    if not timm.is_model(TINY_TIMM):
        _tiny_eva.__name__ = TINY_TIMM
        timm.models.register_model(_tiny_eva)
    # same shape as open_clip's EVA02-L-14-336.json: a timm tower whose classifier head is the projection
    cfg = {
        "embed_dim": PROJ,
        "vision_cfg": {"image_size": IMAGE, "timm_model_name": TINY_TIMM, "timm_pool": "token", "timm_proj": None},
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
        "custom_text": True,
    }
    path = tmp_path_factory.mktemp("clipcfg") / f"{TINY_CLIP}.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    return TINY_CLIP


@pytest.fixture(scope="module")
def reference(tiny_name):
    torch.manual_seed(0)
    return EvaClipEncoder(None, model_name=tiny_name, blocks=(2, 4))


def _eva_file_state(enc: EvaClipEncoder) -> dict[str, torch.Tensor]:
    """A full EVA-CLIP-format checkpoint: vision tower with rope buffers (tower and per block), text tower, scale."""
    rope = {"visual.rope.freqs_cos": torch.randn(9, 16), "visual.rope.freqs_sin": torch.randn(9, 16)}
    rope |= {f"visual.blocks.{i}.attn.rope.freqs_cos": rope["visual.rope.freqs_cos"] for i in range(DEPTH)}
    rope |= {f"visual.blocks.{i}.attn.rope.freqs_sin": rope["visual.rope.freqs_sin"] for i in range(DEPTH)}
    state = open_clip_to_eva_clip(enc.visual.state_dict(), rope)
    state["text.token_embedding.weight"] = torch.randn(64, 16)
    state["logit_scale"] = torch.tensor(4.6)
    return state


def _faces(n: int = 2, size: int = 64) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_eva_clip_layout_names(reference):
    state = _eva_file_state(reference)
    for key in (
        "visual.blocks.0.attn.q_proj.weight",
        "visual.blocks.0.attn.k_proj.weight",
        "visual.blocks.0.attn.q_bias",
        "visual.blocks.0.attn.v_bias",
        "visual.blocks.0.attn.inner_attn_ln.weight",
        "visual.blocks.3.mlp.w1.weight",
        "visual.blocks.3.mlp.w2.weight",
        "visual.blocks.3.mlp.w3.weight",
        "visual.blocks.3.mlp.ffn_ln.bias",
        "visual.patch_embed.proj.weight",
        "visual.cls_token",
        "visual.pos_embed",
        "visual.norm.weight",
        "visual.head.weight",
    ):
        assert key in state, key
    assert not any(".trunk." in k or "fc1_g" in k or "q_proj.bias" in k for k in state)


def test_conversion_agrees_with_timm_filter(reference):
    """timm's own EVA checkpoint filter is an independent reading of the same layout."""
    from timm.models.eva import checkpoint_filter_fn

    state = _eva_file_state(reference)
    ours = eva_clip_to_open_clip(state)
    theirs = checkpoint_filter_fn({k: v for k, v in state.items() if k.startswith("visual.")}, reference.visual.trunk)
    assert set(ours) == {f"trunk.{k}" for k in theirs}
    for k, v in theirs.items():
        assert torch.equal(ours[f"trunk.{k}"], v), k


def test_eva_clip_file_loads_strictly_and_matches(reference, tiny_name, tmp_path):
    path = tmp_path / "EVA02_CLIP_L_336_psz14_s6B.pt"
    torch.save(_eva_file_state(reference), path)
    torch.manual_seed(123)  # different random init: equal outputs can only come from the loaded weights
    loaded = EvaClipEncoder(path, model_name=tiny_name, blocks=(2, 4))
    faces = _faces()
    a, b = reference(faces), loaded(faces)
    for k in a.vectors:
        torch.testing.assert_close(a.vectors[k], b.vectors[k])
    for k in a.tokens:
        torch.testing.assert_close(a.tokens[k], b.tokens[k])

    # an open_clip-layout file (the whole CLIP model) loads too
    oc_path = tmp_path / "open_clip.pt"
    torch.save({f"visual.{k}": v for k, v in reference.visual.state_dict().items()}, oc_path)
    torch.testing.assert_close(
        EvaClipEncoder(oc_path, model_name=tiny_name, blocks=(2, 4))(faces).vectors["clip"], a.vectors["clip"]
    )


def test_unknown_or_missing_keys_fail(reference, tiny_name, tmp_path):
    state = _eva_file_state(reference)
    state["visual.blocks.0.attn.relative_position_bias_table"] = torch.zeros(3)
    torch.save(state, tmp_path / "extra.pt")
    with pytest.raises(RuntimeError, match="relative_position_bias_table"):
        EvaClipEncoder(tmp_path / "extra.pt", model_name=tiny_name, blocks=(4,))
    state = _eva_file_state(reference)
    del state["visual.blocks.1.mlp.w3.weight"]
    torch.save(state, tmp_path / "missing.pt")
    with pytest.raises(RuntimeError, match=r"blocks\.1\.mlp\.fc2\.weight"):
        EvaClipEncoder(tmp_path / "missing.pt", model_name=tiny_name, blocks=(4,))


def test_outputs_are_hidden_states_entering_blocks(reference):
    faces = _faces()
    feats = reference(faces)
    assert set(feats.vectors) == {"clip"} and list(feats.tokens) == ["clip_block2", "clip_block4"]
    assert feats.vectors["clip"].shape == (2, PROJ)
    assert reference.vector_dims == {"clip": PROJ}
    assert reference.token_dims == {"clip_block2": WIDTH, "clip_block4": WIDTH}
    torch.testing.assert_close(feats.vectors["clip"].norm(dim=-1), torch.ones(2))
    for v in feats.tokens.values():
        assert v.shape == (2, 1 + 9, WIDTH)

    # run the tower by hand: the state entering block k (1-based count) is the output of block k - 1
    trunk = reference.visual.trunk
    with torch.no_grad():
        x = reference.preprocess(faces)
        x, rope = trunk._pos_embed(trunk.patch_embed(x))
        entering = {}
        for i, blk in enumerate(trunk.blocks):
            entering[i] = x
            x = blk(x, rope=rope)
        entering[DEPTH] = x
        proj = torch.nn.functional.normalize(reference.visual(reference.preprocess(faces)), dim=-1)
    torch.testing.assert_close(feats.tokens["clip_block2"], entering[2])
    torch.testing.assert_close(feats.tokens["clip_block4"], entering[4])
    torch.testing.assert_close(feats.vectors["clip"], proj)


def test_preprocessing_is_grayscale_bicubic_normalised(reference, tiny_name):
    faces = _faces(1)
    luma = (faces[:, 0:1] * 0.299 + faces[:, 1:2] * 0.587 + faces[:, 2:3] * 0.114).expand(-1, 3, -1, -1)
    # a colour face and its gray copy look the same to the paper's CLIP input
    torch.testing.assert_close(reference(faces).vectors["clip"], reference(luma).vectors["clip"])
    x = reference.preprocess(faces)
    assert x.shape == (1, 3, IMAGE, IMAGE)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    # white stays white: parsed backgrounds map to the model's normalised white
    white = reference.preprocess(torch.ones(1, 3, 64, 64))
    expected = (1 - mean) / torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(white, expected.expand_as(white))

    torch.manual_seed(0)
    colour = EvaClipEncoder(None, model_name=tiny_name, blocks=(2,), grayscale=False)
    colour.load_state_dict(reference.state_dict())
    assert not torch.allclose(colour(faces).vectors["clip"], colour(luma).vectors["clip"])


def test_block_indices_are_checked(tiny_name):
    with pytest.raises(ValueError, match="1..4"):
        EvaClipEncoder(None, model_name=tiny_name, blocks=(0, 4))


def test_full_size_eva02_layout_round_trip():
    """The built-in EVA02-L-14-336 tower (on the meta device: names and shapes only) maps both ways."""
    with torch.device("meta"):
        model = open_clip.create_model("EVA02-L-14-336", pretrained=None, device="meta")
    visual = model.visual.state_dict()
    eva = open_clip_to_eva_clip(visual)
    assert eva["visual.pos_embed"].shape == (1, 577, 1024)
    assert eva["visual.head.weight"].shape == (768, 1024)
    assert "visual.blocks.23.mlp.w3.weight" in eva and "visual.blocks.23.attn.q_bias" in eva
    assert sum(k.startswith("visual.blocks.") for k in eva) == 24 * 21
    back = eva_clip_to_open_clip(
        eva | {"text.positional_embedding": torch.empty(0), "visual.rope.freqs_cos": torch.empty(0)}
    )
    assert set(back) == set(visual)


@pytest.mark.slow
def test_full_size_eva02_from_eva_clip_file(tmp_path):
    """EVA02-CLIP-L-14-336 at full size with random weights: an EVA-CLIP file loads and gives the paper's shapes."""
    torch.manual_seed(0)
    ref = EvaClipEncoder(None)
    rope = {"visual.rope.freqs_cos": torch.zeros(576, 64), "visual.rope.freqs_sin": torch.zeros(576, 64)}
    path = tmp_path / "EVA02_CLIP_L_336_psz14_s6B.pt"
    torch.save(open_clip_to_eva_clip(ref.visual.state_dict(), rope) | {"logit_scale": torch.tensor(4.6)}, path)
    del ref.visual.trunk.blocks[6:]  # keep memory low: only the comparison below needs the reference
    enc = EvaClipEncoder(path)
    faces = _faces(1, 128)
    feats = enc(faces)
    assert feats.vectors["clip"].shape == (1, 768)
    assert list(feats.tokens) == [f"clip_block{k}" for k in (4, 8, 12, 16, 20)]
    for v in feats.tokens.values():
        assert v.shape == (1, 577, 1024)
    ref.blocks = (4,)
    torch.testing.assert_close(ref(faces).tokens["clip_block4"], feats.tokens["clip_block4"])
