"""Real weights in, real weights out: a tiny published directory made by diffusers initialises training; the run
exports to a directory that diffusers' ConsisIDPipeline loads and samples exactly as our model does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CONF, TINY_OVERRIDES, tiny_cogvideox_vae
from test_denoiser import CONSISID_TINY, _randomise

FRAMES, SIZE = 9, 32  # the tiny VAE: x4 spatial, x4 temporal -> 3 latent frames of 8 x 8
LATENT_C, TEXT_LEN, TEXT_DIM = 4, 16, 16

pytestmark = pytest.mark.filterwarnings("ignore:.*estimate.*:FutureWarning")


def _vae_and_t5(root: Path) -> None:
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    torch.manual_seed(0)
    vae = tiny_cogvideox_vae(LATENT_C, SIZE, SIZE)
    vae.save_pretrained(root / "vae")
    words = ["a", "person", "smiles", "at", "the", "camera", "face", "with", "light", "dark", "skin"]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)] + [("\u2581" + w, -1.0) for w in words]
    T5Tokenizer(vocab=vocab, extra_ids=0).save_pretrained(root / "tokenizer")
    config = T5Config(vocab_size=len(vocab), d_model=TEXT_DIM, d_kv=4, d_ff=32, num_layers=1, num_heads=2)
    T5EncoderModel(config).save_pretrained(root / "text_encoder")


def _overrides(root: Path) -> list[str]:
    sizes = [o for o in TINY_OVERRIDES if not o.startswith(("model.text_encoder.", "data.num_frames"))]
    return [
        *sizes,
        *CONSISID_TINY,
        f"data.num_frames={FRAMES}",
        f"model.backbone.config.sample_frames={FRAMES}",
        "model/vae=cogvideox",
        f"model.vae.path={root}",
        "model/text_encoder=t5",
        f"model.text_encoder.path={root}",
        f"model.text_encoder.max_length={TEXT_LEN}",
    ]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, standin_cache):
    """A published directory made by diffusers, and a run that started from it and trained 2 steps."""
    from conftest import compose_train
    from diffusers import ConsisIDPipeline, ConsisIDTransformer3DModel
    from diffusers.models import AutoencoderKLCogVideoX
    from transformers import T5EncoderModel, T5Tokenizer

    from consisid_lab.models.consisid import consisid_config
    from consisid_lab.models.denoiser import build_denoiser
    from consisid_lab.models.diffusion import make_scheduler
    from consisid_lab.train import train

    tmp = tmp_path_factory.mktemp("export")
    root = tmp / "published"
    _vae_and_t5(root)
    cfg = compose_train(_overrides(root), tmp / "probe", standin_cache, tiny=False)
    transformer = ConsisIDTransformer3DModel(**consisid_config(build_denoiser(cfg.model))).eval()
    _randomise(transformer, seed=7)
    ConsisIDPipeline(
        tokenizer=T5Tokenizer.from_pretrained(root / "tokenizer"),
        text_encoder=T5EncoderModel.from_pretrained(root / "text_encoder"),
        vae=AutoencoderKLCogVideoX.from_pretrained(root / "vae"),
        transformer=transformer,
        scheduler=make_scheduler(),
    ).save_pretrained(root, max_shard_size="40KB")
    run = tmp / "run"
    cfg = compose_train(
        [*_overrides(root), f"model.init_from={root}", "trainer.max_steps=2", "test=false",
         "trainer.val_check_interval=100", "~callbacks.frequency"],
        run,
        standin_cache,
        tiny=False,
    )  # fmt: skip
    train(cfg)
    return root, run, transformer, cfg


def _export(run: Path, out: Path, *overrides: str) -> Path:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from consisid_lab.export import export

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("export", overrides=[f"ckpt_path={run}", f"out_dir={out}", *overrides])
    return export(cfg)


def test_training_started_from_the_published_weights(trained):
    from consisid_lab.eval import load_module
    from consisid_lab.models.consisid import to_diffusers_state_dict

    _, run, transformer, _ = trained
    trained_sd = to_diffusers_state_dict(load_module(str(run / "checkpoints" / "last.ckpt"), use_ema=False).denoiser)
    start = transformer.state_dict()
    # A few steps moved the weights a little from the published ones, not from a random initialisation.
    moved = [k for k in start if not torch.equal(start[k], trained_sd[k])]
    assert moved
    rel = max(((trained_sd[k] - start[k]).norm() / start[k].norm()).item() for k in moved)
    assert rel < 0.05


def test_the_exported_directory_samples_in_consisid_pipeline_as_our_model(trained, tmp_path):
    from diffusers import ConsisIDPipeline
    from PIL import Image

    from consisid_lab.eval import load_module
    from consisid_lab.generate import sample_published
    from consisid_lab.models.consisid import consisid_config
    from consisid_lab.models.published import PublishedModel

    _, run, _, _ = trained
    out = _export(run, tmp_path / "exported")
    assert (out / "model_index.json").is_file() and (out / "transformer" / "config.json").is_file()
    pipe = ConsisIDPipeline.from_pretrained(str(out))
    pipe.set_progress_bar_config(disable=True)
    # Our model: the checkpoint's EMA weights (what export writes by default), sampled the released way.
    module = load_module(str(run / "checkpoints" / "last.ckpt"), use_ema=True).eval()
    d = module.denoiser
    ours = PublishedModel(out, d, d.vae, d.text_encoder, module.noise_scheduler, consisid_config(d))

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    face = torch.from_numpy(np.asarray(image)).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        features = d.local_encoder(face)
    id_cond = torch.cat(list(features.vectors.values()), dim=-1)
    vit = list(features.tokens.values())
    prompt = "a person smiles at the camera"
    common = {"num_frames": FRAMES, "height": SIZE, "width": SIZE, "guidance_scale": 3.0, "use_dynamic_cfg": False}

    def theirs(output_type: str):
        return pipe(
            image=image, prompt=prompt, num_inference_steps=3, generator=torch.Generator().manual_seed(0),
            output_type=output_type, id_cond=id_cond, id_vit_hidden=vit, max_sequence_length=TEXT_LEN, **common,
        ).frames  # fmt: skip

    def our(decode: bool, cond=id_cond):
        text, negative = d.text_encoder([prompt, ""]).split(1)
        return sample_published(
            ours, image, cond, vit, text, negative, num_steps=3, generator=torch.Generator().manual_seed(0),
            decode=decode, **common,
        )  # fmt: skip

    latents = our(decode=False)
    torch.testing.assert_close(latents, theirs("latent"), rtol=1e-5, atol=1e-5)
    ref = theirs("pt")  # (B, F, 3, H, W) in [0, 1]
    video = our(decode=True)
    assert video.shape == ref.shape == (1, FRAMES, 3, SIZE, SIZE)
    torch.testing.assert_close((video / 2 + 0.5).clamp(0, 1), ref, rtol=0, atol=1e-5)
    # Not vacuous: the identity input moves the samples by far more than the tolerance above.
    assert (our(decode=False, cond=id_cond + 1) - latents).abs().max() > 1e-4


def test_export_refuses_a_composition_diffusers_cannot_express(train_cfg, tmp_path):
    from consisid_lab.export import write_published
    from consisid_lab.models.consisid import NotExpressibleError
    from consisid_lab.models.denoiser import build_denoiser
    from consisid_lab.models.diffusion import make_scheduler

    with pytest.raises(NotExpressibleError, match="model/vae: StandInCodec"):
        write_published(build_denoiser(train_cfg().model), make_scheduler(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_fused_lora_keeps_the_output_and_gives_the_base_keys(train_cfg):
    from consisid_lab.models.trainable import fuse_lora
    from consisid_lab.utils.instantiate import instantiate

    module = instantiate(train_cfg("+experiment=lora").model).eval()
    transformer = module.denoiser.backbone.transformer
    with torch.no_grad():  # peft starts lora_B at zero: make the adapters change the output
        for name, p in transformer.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.1)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 32, 8, 8, generator=gen)
    text = torch.randn(1, 16, 32, generator=gen)
    t = torch.tensor([500])
    with torch.no_grad():
        before = module.denoiser.backbone(x, text, t)
        assert fuse_lora(transformer) > 0
        after = module.denoiser.backbone(x, text, t)
    assert not any("lora_" in k or "base_layer" in k for k in transformer.state_dict())
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


def test_a_trained_base_exports_its_backbone_and_a_fine_tune_trains_from_it(train_cfg, tmp_path, standin_cache):
    from conftest import compose_train
    from safetensors.torch import load_file

    from consisid_lab.eval import load_module
    from consisid_lab.train import train

    short = ["trainer.max_steps=2", "test=false", "trainer.val_check_interval=100", "~callbacks.frequency"]
    cfg = train_cfg("+experiment=i2v_base", *short)
    train(cfg)
    run = Path(cfg.paths.output_dir)
    with pytest.raises(ValueError, match=r"layout='pipeline' is unknown"):
        _export(run, tmp_path / "bad", "layout=pipeline")
    base = _export(run, tmp_path / "base", "layout=backbone")
    # What is written is the run's EMA weights, as validation saw them.
    ema = load_module(run / "checkpoints" / "last.ckpt", use_ema=True).denoiser
    saved = load_file(str(base / "transformer" / "diffusion_pytorch_model.safetensors"))
    ours = ema.backbone.transformer.state_dict()
    assert saved.keys() == ours.keys()
    assert [k for k in saved if not torch.equal(saved[k], ours[k])] == []
    assert (base / "text_encoder" / "config.json").is_file()

    tuned = compose_train(["+experiment=from_base", f"base_dir={base}", *short], tmp_path / "tuned", standin_cache)
    train(tuned)
    first = load_module(tmp_path / "tuned" / "checkpoints" / "last.ckpt", use_ema=False).denoiser
    assert first.local_encoder is not None and sum(p.numel() for p in first.fuser.parameters()) > 0
