"""Contracts of the backbone's injection points, the injectors and the fusers."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.transformers.cogvideox_transformer_3d import CogVideoXBlock, CogVideoXTransformer3DModel

from consisid_lab.models.backbone import IN_BLOCK_SITES, INJECTION_SITES, VideoDiT
from consisid_lab.models.denoiser import Conditions, IdentityDenoiser
from consisid_lab.models.fuser import ConcatFuser, MLPFuser, PerceiverFuser
from consisid_lab.models.injector import CrossAttentionInjector, NoInjector
from consisid_lab.types import FeatureSpec, IdentityFeatures

B, F, C_IN, C_OUT, H, W, L, D_TEXT = 2, 2, 6, 3, 8, 8, 5, 32
KV, Q = 24, 4
POSITIONS = INJECTION_SITES  # declared once by the backbone


def _randomise(module: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _backbone(num_layers: int = 2, seed: int = 0) -> VideoDiT:
    torch.manual_seed(seed)
    model = VideoDiT("tiny", in_channels=C_IN, out_channels=C_OUT, config={"num_layers": num_layers}).eval()
    _randomise(model, seed)  # a stand-in for a pretrained backbone: no zero-initialised paths
    return model


def _injector(backbone: VideoDiT, position: str, scale: float = 1.0, zero_init: bool = False, seed: int = 7):
    inj = CrossAttentionInjector(
        backbone.inner_dim, KV, backbone.num_layers, interval=2, position=position, heads=2, dim_head=8,
        scale=scale, zero_init=zero_init,
    )  # fmt: skip
    if not zero_init:
        _randomise(inj, seed)
    return inj


def _inputs(seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(B, F, C_IN, H, W, generator=g),
        "encoder_hidden_states": torch.randn(B, L, D_TEXT, generator=g),
        "timestep": torch.tensor([3, 900]),
    }


def _id_tokens(seed: int) -> torch.Tensor:
    return torch.randn(B, Q, KV, generator=torch.Generator().manual_seed(seed))


def _run(model: VideoDiT, tokens: torch.Tensor | None, x: dict) -> torch.Tensor:
    rot = model.rotary_embedding(F, H, W)
    with torch.no_grad():
        return model(**x, image_rotary_emb=rot, identity_tokens=tokens)


# ---------------------------------------------------------------------------------------------- backbone


def test_backbone_without_injection_equals_diffusers() -> None:
    ours = _backbone()
    plain = CogVideoXTransformer3DModel(**ours.config).eval()
    plain.load_state_dict(ours.transformer.state_dict(), strict=True)
    assert type(plain.transformer_blocks[0]) is CogVideoXBlock
    assert all(isinstance(b, CogVideoXBlock) for b in ours.blocks)  # block-class wrapping policies still apply
    x = _inputs()
    rot = ours.rotary_embedding(F, H, W)
    assert rot[0].shape == (F * (H // 2) * (W // 2), ours.config["attention_head_dim"])
    with torch.no_grad():
        expected = plain(**x, image_rotary_emb=rot).sample
        got = ours(**x, image_rotary_emb=rot)
    assert got.shape == (B, F, C_OUT, H, W)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_backbone_rejects_wrong_channels() -> None:
    model = _backbone()
    x = _inputs()
    x["hidden_states"] = x["hidden_states"][:, :, :4]
    with pytest.raises(ValueError, match="in_channels"):
        model(**x)


def test_the_backbone_declares_its_sites_once() -> None:
    assert set(IN_BLOCK_SITES) < set(INJECTION_SITES) == set(VideoDiT.injection_sites)
    import inspect

    from consisid_lab.models.backbone import InjectableBlock

    # every in-block site is a keyword of the block's forward (what the plain and the checkpointed call pass)
    assert set(IN_BLOCK_SITES) <= set(inspect.signature(InjectableBlock.forward).parameters)


def test_set_injector_refuses_sites_and_sizes_the_backbone_lacks() -> None:
    class NoInBlockSites(VideoDiT):
        injection_sites = ("after_block",)

    model = NoInBlockSites("tiny", in_channels=C_IN, out_channels=C_OUT, config={"num_layers": 2})
    inj = CrossAttentionInjector(model.inner_dim, KV, 2, position="between_attn_ffn", heads=2, dim_head=8)
    with pytest.raises(ValueError, match=r"position\(s\) \['between_attn_ffn'\].*one of \['after_block'\]"):
        model.set_injector(inj)
    with pytest.raises(ValueError, match="built for 3 blocks but the backbone has 2"):
        model.set_injector(CrossAttentionInjector(model.inner_dim, KV, 3, position="after_block", heads=2, dim_head=8))
    with pytest.raises(ValueError, match="position 'attn_input' is unknown"):
        CrossAttentionInjector(32, KV, 2, position="attn_input", sites=model.injection_sites)


@pytest.mark.parametrize("position", POSITIONS)
def test_gradient_checkpointing_gives_the_same_loss_and_grads(position: str) -> None:
    x = _inputs()
    tokens = _id_tokens(2).requires_grad_(True)
    results = []
    for ckpt in (False, True):
        model = _backbone()
        model.set_injector(_injector(model, position))
        model.enable_gradient_checkpointing(ckpt)
        t = tokens.detach().clone().requires_grad_(True)
        loss = model(**x, image_rotary_emb=model.rotary_embedding(F, H, W), identity_tokens=t).square().mean()
        loss.backward()
        grad_block = model.blocks[0].ff.net[2].weight.grad.clone()
        results.append((loss.detach(), grad_block, t.grad.clone()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)
    assert results[0][2].abs().max() > 0  # gradients reach the identity tokens through the injection


# ---------------------------------------------------------------------------------------------- injectors


@pytest.mark.parametrize("position", POSITIONS)
def test_changing_identity_changes_output(position: str) -> None:
    model = _backbone()
    model.set_injector(_injector(model, position))
    x = _inputs()
    a, b = _run(model, _id_tokens(2), x), _run(model, _id_tokens(3), x)
    assert (a - b).abs().max() > 1e-3


@pytest.mark.parametrize("position", POSITIONS)
def test_scale_zero_equals_backbone_alone(position: str) -> None:
    model = _backbone()
    x = _inputs()
    alone = _run(model, None, x)
    model.set_injector(_injector(model, position, scale=0.0))
    assert torch.equal(_run(model, _id_tokens(2), x), alone)
    model.set_injector(NoInjector())
    assert torch.equal(_run(model, _id_tokens(2), x), alone)


@pytest.mark.parametrize("position", POSITIONS)
def test_zero_init_leaves_pretrained_backbone_unchanged_and_learns(position: str) -> None:
    model = _backbone()
    x = _inputs()
    alone = _run(model, None, x)
    inj = _injector(model, position, zero_init=True)
    model.set_injector(inj)
    torch.testing.assert_close(_run(model, _id_tokens(2), x), alone, atol=0, rtol=0)
    # ... yet the zero-initialised output projection gets a gradient, so training can open the route.
    out = model(**x, image_rotary_emb=model.rotary_embedding(F, H, W), identity_tokens=_id_tokens(2))
    out.square().mean().backward()
    assert inj.layers[0].to_out.weight.grad.abs().max() > 0


class _Recorder:
    """Forward (pre-)hooks by module name: records a module's input video tokens and output."""

    def __init__(self, model: VideoDiT, names: list[str]) -> None:
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles = []
        for name in names:
            module = model.get_submodule(name)
            self.handles.append(module.register_forward_pre_hook(self._pre(name), with_kwargs=True))
            self.handles.append(module.register_forward_hook(self._post(name)))

    def _pre(self, name):
        def hook(_m, args, kwargs):
            self.inputs[name] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

        return hook

    def _post(self, name):
        def hook(_m, _args, output):
            self.outputs[name] = (output[0] if isinstance(output, tuple) else output).detach().clone()

        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _record(position: str, names: list[str]) -> tuple[_Recorder, _Recorder]:
    model = _backbone()
    model.set_injector(_injector(model, position))
    x = _inputs()
    recs = []
    for seed in (2, 3):
        rec = _Recorder(model, names)
        _run(model, _id_tokens(seed), x)
        rec.close()
        recs.append(rec)
    return recs[0], recs[1]


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a, b)


def test_attn_input_is_wired_before_the_attention() -> None:
    blk = "transformer.transformer_blocks.0"
    a, b = _record("attn_input", [blk, f"{blk}.attn1"])
    assert _same(a.inputs[blk], b.inputs[blk])  # the block receives the same tokens ...
    assert not _same(a.inputs[f"{blk}.attn1"], b.inputs[f"{blk}.attn1"])  # ... its attention does not


def test_attn_input_reaches_the_residual_stream_only_through_the_attention() -> None:
    model = _backbone(num_layers=1)
    model.set_injector(_injector(model, "attn_input"))
    with torch.no_grad():  # silence the attention's output: the identity then has no way into the block output
        model.blocks[0].attn1.to_out[0].weight.zero_()
        model.blocks[0].attn1.to_out[0].bias.zero_()
    x = _inputs()
    torch.testing.assert_close(_run(model, _id_tokens(2), x), _run(model, _id_tokens(3), x), atol=0, rtol=0)


def test_between_attn_ffn_is_wired_between_attention_and_ff() -> None:
    blk = "transformer.transformer_blocks.0"
    a, b = _record("between_attn_ffn", [blk, f"{blk}.attn1", f"{blk}.ff"])
    assert _same(a.inputs[f"{blk}.attn1"], b.inputs[f"{blk}.attn1"])
    assert _same(a.outputs[f"{blk}.attn1"], b.outputs[f"{blk}.attn1"])  # attention untouched
    assert not _same(a.inputs[f"{blk}.ff"], b.inputs[f"{blk}.ff"])  # the FF sees the identity
    assert not _same(a.outputs[blk], b.outputs[blk])  # and the block output hook (a tuple) fired


def test_after_block_is_wired_after_the_whole_block() -> None:
    b0, b1 = "transformer.transformer_blocks.0", "transformer.transformer_blocks.1"
    a, b = _record("after_block", [b0, f"{b0}.ff", b1, "injector.layers.0"])
    assert _same(a.inputs[f"{b0}.ff"], b.inputs[f"{b0}.ff"])
    assert _same(a.outputs[b0], b.outputs[b0])  # block 0's own output unchanged ...
    assert not _same(a.inputs[b1], b.inputs[b1])  # ... block 1's input carries the identity
    assert a.outputs["injector.layers.0"].shape == a.outputs[b0].shape  # (B, N_video, D)


def test_injector_declares_its_places() -> None:
    inj = CrossAttentionInjector(32, KV, num_layers=5, interval=2, position="between_attn_ffn", heads=2, dim_head=8)
    assert len(inj.layers) == 3  # blocks 0, 2, 4
    assert [i for i in range(5) if inj.has(i, "between_attn_ffn")] == [0, 2, 4]
    assert not any(inj.has(i, "after_block") for i in range(5))
    assert all(torch.count_nonzero(layer.to_out.weight) == 0 for layer in inj.layers)
    with pytest.raises(ValueError, match="position"):
        CrossAttentionInjector(32, KV, num_layers=2, position="inside")


# ---------------------------------------------------------------------------------------------- fusers


def _features(vector_dims=(8, 6), token_shapes=((5, 16), (7, 16), (3, 16))) -> IdentityFeatures:
    g = torch.Generator().manual_seed(0)
    return IdentityFeatures(
        vectors={f"v{i}": torch.randn(B, d, generator=g) for i, d in enumerate(vector_dims)},
        tokens={f"t{i}": torch.randn(B, n, d, generator=g) for i, (n, d) in enumerate(token_shapes)},
    )


def test_perceiver_fuser_shapes_and_identity_dependence() -> None:
    fuser = PerceiverFuser(
        id_dim=14, vit_dim=16, depth=3, dim_head=8, heads=2, num_id_token=2, num_queries=Q, output_dim=KV,
        ff_mult=2, token_dims=[16, 16, 16],
    )  # fmt: skip
    feats = _features()
    out = fuser(feats)
    assert out.shape == (B, Q, KV)
    assert fuser.num_scale == 3 and len(fuser.layers) == 3 and len(fuser.input_proj) == 0
    other = _features()
    other.tokens["t2"] = other.tokens["t2"] + 1.0
    assert (fuser(other) - out).abs().max() > 1e-4  # the last scale's tokens matter


def test_perceiver_fuser_projects_maps_of_another_width() -> None:
    fuser = PerceiverFuser(
        id_dim=14, vit_dim=16, depth=2, dim_head=8, heads=2, num_id_token=2, num_queries=Q, output_dim=KV,
        token_dims=[12, 16],
    )  # fmt: skip
    assert list(fuser.input_proj) == ["0"]
    assert fuser(_features(token_shapes=((9, 12), (4, 16)))).shape == (B, Q, KV)
    with pytest.raises(ValueError, match="token map 0 has width 16"):
        fuser(_features(token_shapes=((9, 16), (4, 16))))


def test_perceiver_fuser_without_token_maps_names_the_fix() -> None:
    with pytest.raises(ValueError, match=r"perceiver.*model/fuser=mlp"):
        PerceiverFuser(id_dim=14, vit_dim=16, token_dims=[])
    fuser = PerceiverFuser(id_dim=14, vit_dim=16, depth=2, dim_head=8, heads=2, num_queries=Q, num_scale=2)
    with pytest.raises(ValueError, match=r"perceiver.*model/fuser=mlp or a local encoder with tokens"):
        fuser(_features(token_shapes=()))
    with pytest.raises(ValueError, match="multiple of 2"):
        PerceiverFuser(id_dim=14, vit_dim=16, depth=3, num_scale=2)


def test_mlp_and_concat_fuser_shapes() -> None:
    feats = _features()
    mlp = MLPFuser(id_dim=14, output_dim=KV, num_tokens=3, token_dims=[16, 16, 16])
    assert mlp(feats).shape == (B, 3, KV)
    pooled = MLPFuser(id_dim=14, output_dim=KV, num_tokens=3, token_dims=[16, 16, 16], pool_tokens=True)
    assert pooled(feats).shape == (B, 3, KV)
    concat = ConcatFuser(output_dim=KV, vector_dims=[8, 6], token_dims=[16, 16, 16])
    assert concat(feats).shape == (B, 2 + 5 + 7 + 3, KV)
    joint = ConcatFuser(output_dim=KV, id_dim=14, token_dims=[16, 16, 16])
    assert joint(feats).shape == (B, 1 + 5 + 7 + 3, KV)
    with pytest.raises(ValueError, match="id_dim=20"):
        MLPFuser(id_dim=20, output_dim=KV)(feats)


@pytest.mark.parametrize(
    "fuser",
    [
        MLPFuser(id_dim=14, output_dim=KV),
        ConcatFuser(output_dim=KV, id_dim=14),
        PerceiverFuser(id_dim=14, vit_dim=16, depth=2, dim_head=8, heads=2, num_queries=Q, num_scale=2),
    ],
    ids=["mlp", "concat", "perceiver"],
)
def test_fusers_refuse_empty_features(fuser) -> None:
    with pytest.raises(ValueError, match="empty IdentityFeatures"):
        fuser(IdentityFeatures())


def test_fusers_are_built_from_the_declared_spec() -> None:
    feats = _features()
    spec = FeatureSpec({"v0": 8, "v1": 6}, {"t0": 16, "t1": 16, "t2": 16}, source="model/local_encoder=test")
    spec.check(feats)
    perceiver = PerceiverFuser(vit_dim=16, layers_per_scale=1, dim_head=8, heads=2, num_queries=Q, output_dim=KV,
                               spec=spec)  # fmt: skip
    assert (perceiver.id_dim, perceiver.token_dims) == (14, [16, 16, 16])
    assert perceiver(feats).shape == (B, Q, KV)
    assert MLPFuser(output_dim=KV, num_tokens=3, pool_tokens=True, spec=spec)(feats).shape == (B, 3, KV)
    concat = ConcatFuser(output_dim=KV, spec=spec)
    assert concat.vector_dims == [8, 6] and concat(feats).shape == (B, 2 + 5 + 7 + 3, KV)
    vectors_only = FeatureSpec({"arcface": 8}, source="model/local_encoder=arcface (arcface_layer=last)")
    with pytest.raises(ValueError, match=r"perceiver needs token maps.*arcface_layer=last.*\['arcface'\].*mlp"):
        PerceiverFuser(vit_dim=16, spec=vectors_only)
    with pytest.raises(ValueError, match="id_dim=20 disagrees.*declares 14"):
        MLPFuser(id_dim=20, output_dim=KV, spec=spec)
    with pytest.raises(ValueError, match="declares no features"):
        MLPFuser(output_dim=KV, spec=FeatureSpec(source="model/local_encoder=none"))
    with pytest.raises(ValueError, match=r"token maps \{'t0': 16\}.*not what model/local_encoder=test declares"):
        spec.check(IdentityFeatures(vectors=dict(feats.vectors), tokens={"t0": feats.tokens["t0"]}))


def test_denoiser_composes_fuser_and_injector() -> None:
    backbone = _backbone()
    backbone.set_injector(_injector(backbone, "between_attn_ffn"))
    fuser = PerceiverFuser(
        id_dim=14, vit_dim=16, depth=3, dim_head=8, heads=2, num_id_token=2, num_queries=Q, output_dim=KV,
        token_dims=[16, 16, 16],
    )  # fmt: skip
    model = IdentityDenoiser(None, None, None, None, None, fuser, backbone).eval()
    x = _inputs()
    feats = _features()

    def run(identity):
        cond = Conditions(text=x["encoder_hidden_states"], identity_tokens=model.identity_tokens(identity))
        return model(x["hidden_states"], x["timestep"], cond)

    with torch.no_grad():
        a = run(feats)
        b = run(feats.index(torch.tensor([1, 0])))  # swap identities
        none = run(None)
    assert a.shape == (B, F, C_OUT, H, W)
    assert (a - b).abs().max() > 1e-3
    torch.testing.assert_close(none, _run(backbone, None, x), atol=0, rtol=0)
