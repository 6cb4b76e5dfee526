"""The one denoiser: the Hydra-composed ConsisID equals diffusers, old checkpoints load, frozen parts stay frozen."""

from __future__ import annotations

import re

import lightning
import pytest
import torch
from diffusers import ConsisIDTransformer3DModel

from consisid_lab.models.consisid import NotExpressibleError, consisid_config, to_diffusers_state_dict
from consisid_lab.models.denoiser import IdentityDenoiser, build_denoiser

TOL = 1e-5
# ConsisID fixes the identity-token width at 2/3 of the DiT width: inner 3 x 16 = 48 -> 32; the perceiver's width
# is the tiny stand-in CLIP's (no input projections, which ConsisID lacks).
CONSISID_TINY = [
    "+experiment=consisid",
    "model.backbone.config.num_attention_heads=3",
    "model.backbone.config.attention_head_dim=16",
    "model.backbone.config.num_layers=4",
    "model.fuser.output_dim=32",
    "model.fuser.vit_dim=96",
]


def _randomise(model: torch.nn.Module, seed: int = 0) -> None:
    # Every parameter random, the zero-initialised ones (adaLN, injector output) included: no path is vacuous.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def _faces(b: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    face = torch.rand(b, 3, size, size, generator=gen) * 2 - 1
    kps = torch.rand(b, 5, 2, generator=gen) * size
    return face, kps


def test_hydra_composed_consisid_equals_diffusers(train_cfg):
    cfg = train_cfg(*CONSISID_TINY)
    ours = build_denoiser(cfg.model).eval()
    assert isinstance(ours, IdentityDenoiser)
    _randomise(torch.nn.ModuleList([ours.fuser, ours.backbone]))
    config = consisid_config(ours)
    assert config["is_train_face"] and not config["is_kps"] and config["cross_attn_interval"] == 2
    ref = ConsisIDTransformer3DModel(**config).eval()
    ref.load_state_dict(to_diffusers_state_dict(ours), strict=True)

    b, frames, size = 2, cfg.data.num_frames, cfg.data.height
    f, c, h, w = ours.vae.latent_shape(frames, size, size)
    face, kps = _faces(b, size, seed=1)
    gen = torch.Generator().manual_seed(2)
    x_t = torch.randn(b, f, c, h, w, generator=gen)
    t = torch.tensor([17, 803])
    with torch.no_grad():
        cond = ours.conditions(face, kps, ["a person smiles", "a person walks"], f)
        got = ours(x_t, t, cond)
        features = ours.local_encoder(face)
        # ConsisID's inputs: id_cond = the vectors concatenated (ArcFace ++ CLIP), the CLIP maps as id_vit_hidden.
        expected = ref(
            hidden_states=torch.cat([x_t, cond.global_latent], dim=2),
            encoder_hidden_states=cond.text,
            timestep=t,
            image_rotary_emb=ours.backbone.rotary_embedding(f, h, w),
            id_cond=torch.cat(list(features.vectors.values()), dim=-1),
            id_vit_hidden=list(features.tokens.values()),
        ).sample
        other = ours(x_t, t, ours.conditions(_faces(b, size, seed=3)[0], kps, cond.text, f))
    assert got.shape == (b, f, c, h, w)
    assert (other - got).abs().max() > 1e-3, "the reference face moves the output: the comparison is not vacuous"
    torch.testing.assert_close(got, expected, atol=TOL, rtol=0)


BACKBONE_ONLY = CONSISID_TINY[:4]


@pytest.mark.parametrize(
    ("overrides", "component"),
    [
        ([*CONSISID_TINY, "model.injector.position=between_attn_ffn"], "model/injector: position='between_attn_ffn'"),
        ([*BACKBONE_ONLY, "model/fuser=mlp"], "model/fuser=mlp"),
        (["model/global_encoder=none"], "model/global_encoder"),
        ([*CONSISID_TINY, "model.fuser.vit_dim=64"], "input projections"),
        ([*CONSISID_TINY, "model.fuser.output_dim=48"], "output_dim=48"),
    ],
)
def test_compositions_consisid_cannot_express_name_the_component(train_cfg, overrides, component):
    denoiser = build_denoiser(train_cfg(*overrides).model)
    with pytest.raises(NotExpressibleError, match=re.escape(component)):
        consisid_config(denoiser)


def test_a_checkpoint_of_the_layout_before_the_denoiser_loads(train_cfg, tmp_path):
    from consisid_lab.eval import load_module
    from consisid_lab.utils.instantiate import instantiate

    module = instantiate(train_cfg().model)
    trainable = {n: p for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("denoiser.") for n in module.state_dict())
    # Old layout: the components at the top level, in the state dict and in the EMA shadow.
    old_state = {k.removeprefix("denoiser."): v.clone() for k, v in module.state_dict().items()}
    shadow = {k.removeprefix("denoiser."): v.detach() + 1.0 for k, v in trainable.items()}
    ckpt = {
        "state_dict": old_state,
        "hyper_parameters": dict(module.hparams),
        "pytorch-lightning_version": lightning.__version__,
        "callbacks": {"TrainableEMA{'decay': 0.99}": {"decay": 0.99, "shadow": shadow}},
    }
    path = tmp_path / "old.ckpt"
    torch.save(ckpt, path)
    raw = load_module(str(path), use_ema=False)
    for k, v in raw.state_dict().items():
        assert torch.equal(v, module.state_dict()[k]), k
    ema = dict(load_module(str(path), use_ema=True).named_parameters())
    name = next(iter(trainable))
    assert torch.equal(ema[name], trainable[name].detach() + 1.0), "the EMA shadow was migrated and applied"


def _tiny_t5(folder) -> None:
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    words = ["a", "person", "smiles", "walks"]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)] + [("\u2581" + w, -1.0) for w in words]
    T5Tokenizer(vocab=vocab, extra_ids=0).save_pretrained(folder / "tokenizer")
    config = T5Config(vocab_size=len(vocab), d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)
    T5EncoderModel(config).save_pretrained(folder / "text_encoder")


T5 = "consisid_lab.models.text_encoder.T5TextEncoder"


def test_the_t5_text_encoder_stays_frozen_under_the_default_selectors(train_cfg, tmp_path):
    from omegaconf import open_dict

    from consisid_lab.utils.instantiate import instantiate

    _tiny_t5(tmp_path)
    cfg = train_cfg()  # the tiny sizes set the bag-of-words' dim, which T5 lacks: swap the group's config in
    with open_dict(cfg):
        cfg.model.text_encoder = {"_target_": T5, "path": str(tmp_path), "max_length": 16}
    module = instantiate(cfg.model)
    assert module.trainable_selectors == ["text_encoder", "fuser", "backbone"]  # the default names the text encoder
    assert module.denoiser.frozen_components() == ["vae", "text_encoder", "local_encoder"]
    t5 = [n for n, _ in module.denoiser.named_parameters() if n.startswith("text_encoder.")]
    assert t5 and not any(p.requires_grad for n, p in module.denoiser.named_parameters() if n in t5)
    assert any(p.requires_grad for p in module.denoiser.backbone.parameters())
    optimised = {id(p) for g in module.configure_optimizers()["optimizer"].param_groups for p in g["params"]}
    assert not any(id(p) in optimised for p in module.denoiser.text_encoder.parameters())
    # The bag-of-words default declares itself trainable: the same selectors train it.
    bow = instantiate(train_cfg().model)
    assert bow.denoiser.frozen_components() == ["vae", "local_encoder"]
    assert all(p.requires_grad for p in bow.denoiser.text_encoder.parameters())
