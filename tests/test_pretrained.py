"""Pretrained initialisation: tiny published ConsisID / CogVideoX directories written by diffusers itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf.errors import InterpolationResolutionError
from test_denoiser import CONSISID_TINY, _randomise

from consisid_lab.models.consisid import NotExpressibleError, consisid_config, to_diffusers_state_dict
from consisid_lab.models.denoiser import build_denoiser
from consisid_lab.models.published import CompositionMismatchError
from consisid_lab.utils.instantiate import instantiate

SHARD = "40KB"  # small enough that every tiny transformer is written in several shards


def _consisid(config: dict, seed: int):
    from diffusers import ConsisIDTransformer3DModel

    model = ConsisIDTransformer3DModel(**config).eval()
    _randomise(model, seed)
    return model


def _shards(folder: Path) -> list[str]:
    index = json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())
    return sorted(set(index["weight_map"].values()))


@pytest.fixture
def published(train_cfg, tmp_path):
    """A published directory for the tiny ConsisID composition: transformer/ and transformer_ema/, sharded."""
    config = consisid_config(build_denoiser(train_cfg(*CONSISID_TINY).model))
    root = tmp_path / "published"
    models = {}
    for seed, sub in enumerate(("transformer", "transformer_ema")):
        models[sub] = _consisid(config, seed)
        models[sub].save_pretrained(root / sub, max_shard_size=SHARD)
    assert len(_shards(root / "transformer")) > 1
    return root, models, config


def _expect_weights_of(module, reference) -> None:
    ours = to_diffusers_state_dict(module.denoiser)
    theirs = reference.state_dict()
    assert ours.keys() == theirs.keys()
    assert [k for k in ours if not torch.equal(ours[k], theirs[k])] == []


def test_init_from_loads_the_ema_transformer_when_present(published, train_cfg):
    root, models, _ = published
    module = instantiate(train_cfg(*CONSISID_TINY, f"model.init_from={root}").model)
    _expect_weights_of(module, models["transformer_ema"])
    assert not any(t.is_meta for t in [*module.parameters(), *module.buffers()])
    # The loaded weights train as the default selectors say.
    assert any(p.requires_grad for p in module.denoiser.backbone.injector.parameters())

    import shutil

    shutil.rmtree(root / "transformer_ema")
    module = instantiate(train_cfg(*CONSISID_TINY, f"model.init_from={root}").model)
    _expect_weights_of(module, models["transformer"])


def test_a_missing_shard_or_index_is_named(published, train_cfg):
    root, _, _ = published
    folder = root / "transformer_ema"
    first = _shards(folder)[0]
    (folder / first).unlink()
    with pytest.raises(FileNotFoundError, match=first):
        instantiate(train_cfg(*CONSISID_TINY, f"model.init_from={root}").model)
    (folder / "diffusion_pytorch_model.safetensors.index.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"diffusion_pytorch_model\.safetensors\.index\.json"):
        instantiate(train_cfg(*CONSISID_TINY, f"model.init_from={root}").model)


def test_another_composition_lists_every_mismatch_before_reading_a_weight(published, train_cfg, tmp_path, monkeypatch):
    import consisid_lab.models.pretrained as pretrained

    _, _, config = published
    other = tmp_path / "other"
    _consisid({**config, "num_layers": 6, "LFE_depth": 5, "LFE_num_querie": 8}, seed=3).save_pretrained(
        other / "transformer", max_shard_size=SHARD
    )

    def must_not_read(*args, **kwargs):
        raise AssertionError("a weight was read before the composition was checked")

    monkeypatch.setattr(pretrained, "load_into", must_not_read)
    with pytest.raises(CompositionMismatchError) as err:
        instantiate(train_cfg(*CONSISID_TINY, f"model.init_from={other}").model)
    msg = str(err.value)
    for name in ("num_layers", "LFE_depth", "LFE_num_querie"):
        assert name in msg
    assert "LFE_vit_dim" not in msg and "in_channels" not in msg  # matching components are not listed


def test_init_from_a_composition_consisid_cannot_express_names_the_component(published, train_cfg):
    root, _, _ = published
    cfg = train_cfg(*CONSISID_TINY, "model.injector.position=between_attn_ffn", f"model.init_from={root}")
    with pytest.raises(NotExpressibleError, match=r"model.init_from.*model/injector"):
        instantiate(cfg.model)


def test_init_from_with_ckpt_path_says_which_wins(train_cfg, tmp_path):
    from consisid_lab.train import train

    cfg = train_cfg(*CONSISID_TINY, f"model.init_from={tmp_path}", f"ckpt_path={tmp_path / 'run'}")
    with pytest.raises(ValueError, match=r"ckpt_path wins.*model\.init_from=null.*ckpt_path=null"):
        train(cfg)


def _cogvideox(config: dict, seed: int):
    from diffusers import CogVideoXTransformer3DModel

    model = CogVideoXTransformer3DModel(**config).eval()
    _randomise(model, seed)
    return model


def test_backbone_pretrained_loads_the_dit_and_leaves_the_identity_modules_new(train_cfg, tmp_path):
    backbone_cfg = dict(build_denoiser(train_cfg().model).backbone.config)
    ref = _cogvideox({k: v for k, v in backbone_cfg.items() if not k.startswith("_")}, seed=4)
    ref.save_pretrained(tmp_path / "cogvideox" / "transformer", max_shard_size=SHARD)
    module = instantiate(train_cfg(f"+model.backbone.pretrained={tmp_path / 'cogvideox'}").model)
    theirs = ref.state_dict()
    ours = module.denoiser.backbone.transformer.state_dict()
    assert ours.keys() == theirs.keys()
    assert [k for k in ours if not torch.equal(ours[k], theirs[k])] == []
    # The identity cross-attention is new and zero-initialised: the pretrained backbone is unchanged at step 0.
    injector = module.denoiser.backbone.injector
    assert all(layer.to_out.weight.abs().sum() == 0 for layer in injector.layers)
    assert not any(t.is_meta for t in module.parameters())

    other = tmp_path / "deeper"
    _cogvideox(
        {**{k: v for k, v in backbone_cfg.items() if not k.startswith("_")}, "num_layers": 3}, seed=5
    ).save_pretrained(other)
    with pytest.raises(CompositionMismatchError, match=r"num_layers: checkpoint has 3"):
        instantiate(train_cfg(f"+model.backbone.pretrained={other}").model)


def test_a_base_backbone_exported_from_one_run_starts_a_fine_tune(train_cfg, tmp_path):
    from consisid_lab.export import write_backbone

    base = instantiate(train_cfg("+experiment=i2v_base").model)
    assert base.denoiser.fuser is None or not any(True for _ in base.denoiser.fuser.parameters())
    _randomise(base.denoiser.backbone.transformer, seed=7)
    _randomise(base.denoiser.text_encoder, seed=8)
    root = write_backbone(base.denoiser, tmp_path / "base", source={"experiment": "i2v_base"})
    assert json.loads((root / "base.json").read_text()) == {"experiment": "i2v_base"}
    with pytest.raises(FileExistsError, match="not empty"):
        write_backbone(base.denoiser, root)

    # Without a base the fine-tune is refused, never silently trained from scratch.
    with pytest.raises(InterpolationResolutionError, match=r"from_base needs base_dir=DIR"):
        instantiate(train_cfg("+experiment=from_base").model)
    tuned = instantiate(train_cfg("+experiment=from_base", f"base_dir={root}").model)
    for part in ("backbone.transformer", "text_encoder"):
        theirs = base.denoiser.get_submodule(part).state_dict()
        ours = tuned.denoiser.get_submodule(part).state_dict()
        assert ours.keys() == theirs.keys()
        assert [k for k in ours if not torch.equal(ours[k], theirs[k])] == [], part
    # The identity modules are the fine-tune's own: present, and the injection starts at zero.
    assert sum(p.numel() for p in tuned.denoiser.fuser.parameters()) > 0
    assert all(layer.to_out.weight.abs().sum() == 0 for layer in tuned.denoiser.backbone.injector.layers)
    # Not vacuous: a model built without the base has other weights.
    fresh = instantiate(train_cfg().model).denoiser.text_encoder.state_dict()
    assert not torch.equal(fresh["embed.weight"], tuned.denoiser.text_encoder.state_dict()["embed.weight"])

    # The global-route ablation that keeps the base's image channels loads it too; the one that drops them is
    # refused, naming the channels.
    zeroed = instantiate(train_cfg("+experiment=[no_global_zeroed,from_base]", f"base_dir={root}").model)
    theirs = base.denoiser.backbone.transformer.state_dict()
    ours = zeroed.denoiser.backbone.transformer.state_dict()
    assert [k for k in ours if not torch.equal(ours[k], theirs[k])] == []
    with pytest.raises(CompositionMismatchError, match=r"in_channels: checkpoint has 32"):
        instantiate(train_cfg("+experiment=[no_global,from_base]", f"base_dir={root}").model)


def test_a_saved_caption_encoder_is_refused_at_other_sizes(tmp_path):
    from consisid_lab.models.text_encoder import BagOfWordsTextEncoder

    BagOfWordsTextEncoder(dim=32, max_length=16).save_pretrained(tmp_path / "text_encoder")
    loaded = BagOfWordsTextEncoder(dim=32, max_length=16, pretrained=str(tmp_path))
    assert loaded(["a person smiles"]).shape == (1, 16, 32)
    with pytest.raises(ValueError, match=r"max_length: saved 16, here 32"):
        BagOfWordsTextEncoder(dim=32, max_length=32, pretrained=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"export layout=backbone"):
        BagOfWordsTextEncoder(pretrained=str(tmp_path / "nowhere"))
