"""Every yaml of every model component group composes, instantiates and runs a forward pass, with the default
composition and with `model=consisid_preview`, at tiny sizes; combinations that cannot work fail naming the
components and the fix."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CONF, compose_train
from test_export import _vae_and_t5
from test_real_data import tiny_clip  # noqa: F401  (fixture)

from consisid_lab.models.denoiser import IdentityDenoiser, build_denoiser
from consisid_lab.utils.run import COMPONENT_GROUPS

GROUPS = COMPONENT_GROUPS  # every model component group a run records
VARIANTS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / "model" / g).glob("*.yaml"))]
BASES = {"default": [], "consisid_preview": ["model=consisid_preview"]}
# Variants each base picks (the tiny sizes below depend on the chosen variant, so group-specific keys never reach
# another variant).
BASE_CHOICES = {
    "default": {"backbone": "tiny", "vae": "standin", "text_encoder": "bow", "local_encoder": "arcface_clip",
                "fuser": "perceiver", "injector": "cross_attention"},
    "consisid_preview": {"backbone": "cogvideox_5b_i2v", "vae": "cogvideox", "text_encoder": "t5",
                         "local_encoder": "insightface_evaclip_released", "fuser": "perceiver_released",
                         "injector": "cross_attention_released"},
}  # fmt: skip
FRAMES, SIZE, TEXT_LEN = 9, 32, 16  # the CogVideoX VAE takes 8k+1 frames
# Combinations that cannot work: the error names the components and the fix.
REFUSED = {
    (
        "default",
        "keypoint_renderer",
        "none",
    ): r"use_kps=true but model/keypoint_renderer=none.*five_point.*use_kps=false",
}

pytestmark = pytest.mark.filterwarnings("ignore:.*estimate.*:FutureWarning")


def _sizes(group: str, variant: str, root: Path, clip_name: str) -> list[str]:
    """Tiny sizes for ``variant`` of ``group`` (``++``: some variants leave the key out)."""
    m = f"++model.{group}."
    if group == "backbone":
        sizes = dict(num_layers=2, num_attention_heads=2, attention_head_dim=16, sample_frames=FRAMES,
                     sample_height=SIZE // 4, sample_width=SIZE // 4, max_text_seq_length=TEXT_LEN)  # fmt: skip
        return [f"{m}config.{k}={v}" for k, v in sizes.items()] + [f"{m}gradient_checkpointing=false"]
    if group == "vae":
        return [f"model.vae.path={root}"] if variant == "cogvideox" else []
    if group == "text_encoder":
        extra = [f"model.text_encoder.path={root}"] if variant == "t5" else ["model.text_encoder.dim=32"]
        return [*extra, f"model.text_encoder.max_length={TEXT_LEN}"]
    if group == "local_encoder" and variant.startswith("insightface"):
        # the CLIP half only, a random tiny EVA tower (no weights are read)
        return [f"{m}clip_random_init=true", f"{m}clip_model_name={clip_name}", f"{m}clip_blocks=[1,2]",
                f"{m}onnx_cache_dir={root / 'onnx'}"]  # fmt: skip
    if group == "fuser":
        if variant.startswith("perceiver"):
            sizes = dict(vit_dim=32, output_dim=32, heads=2, dim_head=8, num_queries=4, layers_per_scale=1, ff_mult=2)
        else:
            sizes = dict(output_dim=32, **({"hidden_dim": 32} if variant == "mlp" else {}))
        return [f"{m}{k}={v}" for k, v in sizes.items()]
    if group == "injector" and variant.startswith("cross_attention"):
        return [f"{m}heads=2", f"{m}dim_head=8"]
    return []


def _overrides(base: str, group: str, variant: str, root: Path, clip_name: str) -> list[str]:
    choices = {**BASE_CHOICES[base], group: variant}
    out = ["debug=fast", "logger=csv", "standins_recipe=tiny", f"data.num_frames={FRAMES}", f"data.height={SIZE}",
           f"data.width={SIZE}", *BASES[base], f"model/{group}={variant}"]  # fmt: skip
    for g, v in choices.items():
        out += _sizes(g, v, root, clip_name)
    return out


@pytest.fixture(scope="module")
def published_parts(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("contract_parts")
    _vae_and_t5(root)  # a tiny CogVideoX VAE and T5 in the diffusers layout
    return root


def _face() -> tuple[torch.Tensor, torch.Tensor]:
    """Two real faces (the mesh renderer and the real local encoder detect them), ``(2, 3, 32, 32)`` in [-1, 1]."""
    from skimage import data

    im = torch.from_numpy(np.ascontiguousarray(data.astronaut()[20:220, 140:340])).permute(2, 0, 1).float()[None]
    face = torch.nn.functional.interpolate(im, size=(SIZE, SIZE), mode="area").div(127.5).sub(1)
    face = torch.cat([face, face.flip(-1)])
    kps = torch.tensor([[11.0, 13], [21, 13], [16, 18], [12, 24], [20, 24]]).expand(2, 5, 2)
    return face, kps


def _forward(model: IdentityDenoiser) -> torch.Tensor:
    face, kps = _face()
    f, c, h, w = model.vae.latent_shape(FRAMES, SIZE, SIZE)
    x_t = torch.randn(2, f, c, h, w, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if model.fuser is not None:  # the local encoder emits what it declares (the fuser was built from that)
            model.local_encoder.spec.check(model.local_encoder(face))
        cond = model.conditions(face, kps, ["a person smiles", "a face"], f)
        out = model(x_t, torch.tensor([10, 900]), cond)
    assert out.shape == x_t.shape and torch.isfinite(out).all()
    return out


@pytest.mark.parametrize("base", sorted(BASES))
@pytest.mark.parametrize(("group", "variant"), VARIANTS, ids=[f"{g}={v}" for g, v in VARIANTS])
def test_every_component_yaml_composes_instantiates_and_runs(
    base,
    group,
    variant,
    published_parts,
    tiny_clip,  # noqa: F811
    standin_cache,
    tmp_path,
):
    cfg = compose_train(
        _overrides(base, group, variant, published_parts, tiny_clip), tmp_path, standin_cache, tiny=False
    )
    refused = REFUSED.get((base, group, variant))
    if refused is not None:
        with pytest.raises(ValueError, match=refused):
            build_denoiser(cfg.model)
        return
    torch.manual_seed(0)
    model = build_denoiser(cfg.model).eval()
    # what the yaml names is what was built (no fallback to another variant)
    built = model.backbone.injector if group == "injector" else model.components()[group]
    assert f"{type(built).__module__}.{type(built).__name__}" == cfg.model[group]._target_
    _forward(model)


def test_every_group_has_yamls():
    groups = {p.name for p in (CONF / "model").iterdir() if p.is_dir()}
    assert set(GROUPS) == groups - {"optimizer", "scheduler"}  # a new group must join the contract test
    assert all(any(g == grp for g, _ in VARIANTS) for grp in GROUPS)


@pytest.mark.parametrize("experiment", ["consisid", "full", "no_keypoints"])
def test_experiments_compose_with_the_global_route_off(experiment, standin_cache, tmp_path, published_parts):
    """`+experiment=consisid model/global_encoder=none` used to crash: the experiment sets use_kps."""
    overrides = [f"+experiment={experiment}", "model/global_encoder=none"]
    for g, v in BASE_CHOICES["default"].items():
        overrides += _sizes(g, v, published_parts, "unused")
    cfg = compose_train(["debug=fast", "standins_recipe=tiny", f"data.num_frames={FRAMES}", f"data.height={SIZE}",
                         f"data.width={SIZE}", *overrides], tmp_path, standin_cache, tiny=False)  # fmt: skip
    model = build_denoiser(cfg.model).eval()
    assert model.global_encoder.channels(model.vae) == 0 and not model.uses_kps
    _forward(model)


def test_a_key_of_another_variant_names_the_setting_and_the_fix(standin_cache, tmp_path, published_parts):
    overrides = [*(_sizes("text_encoder", "bow", published_parts, "")), "model/global_encoder=none",
                 "+model.global_encoder.arcface_layer=last"]  # fmt: skip
    cfg = compose_train(overrides, tmp_path, standin_cache)
    with pytest.raises(ValueError, match=r"NoGlobalEncoder takes no setting 'arcface_layer'.*~<group path>"):
        build_denoiser(cfg.model)
    cfg = compose_train(["model/global_encoder=none", "+model.global_encoder.use_kps=true"], tmp_path, standin_cache)
    with pytest.raises(ValueError, match="global_encoder=none has no latent.*use_kps=false.*face_latent"):
        build_denoiser(cfg.model)


def test_arcface_layer_experiments_give_the_declared_features(standin_cache, tmp_path, published_parts):
    """last: the 512-d embedding only; penultimate: the spatial map instead; both (the default): the two."""
    face, _ = _face()
    built = {}
    cases = {
        "last": ["+experiment=arcface_last"],
        "penultimate": ["+experiment=arcface_penultimate"],
        "both": [],
        "only_map": ["+experiment=arcface_only", "model.local_encoder.arcface_layer=penultimate"],
    }
    sizes = [o for g, v in BASE_CHOICES["default"].items() for o in _sizes(g, v, published_parts, "")]
    common = ["debug=fast", "standins_recipe=tiny", f"data.num_frames={FRAMES}", f"data.height={SIZE}"]
    for name, overrides in cases.items():
        cfg = compose_train([*common, f"data.width={SIZE}", *sizes, *overrides], tmp_path, standin_cache, tiny=False)
        if name == "only_map":  # the perceiver's ID tokens come from vectors: refused naming the fix
            with pytest.raises(ValueError, match="perceiver needs feature vectors.*arcface_layer=penultimate.*both"):
                build_denoiser(cfg.model)
            continue
        model = build_denoiser(cfg.model).eval()
        _forward(model)
        with torch.no_grad():
            built[name] = model.local_encoder(face)
        assert model.local_encoder.spec.vectors == {k: v.shape[-1] for k, v in built[name].vectors.items()}
    last, pen, both = built["last"], built["penultimate"], built["both"]
    assert "arcface" in last.vectors and "arcface_penultimate" not in last.tokens
    assert "arcface" not in pen.vectors and "arcface_penultimate" in pen.tokens
    assert set(both.vectors) == set(last.vectors) and set(both.tokens) == set(pen.tokens)
    assert set(last.tokens) | {"arcface_penultimate"} == set(pen.tokens)  # CLIP's maps are there in every case
    torch.testing.assert_close(both.vectors["arcface"], last.vectors["arcface"])
    torch.testing.assert_close(both.tokens["arcface_penultimate"], pen.tokens["arcface_penultimate"])
