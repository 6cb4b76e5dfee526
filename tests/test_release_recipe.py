"""The released training recipe (+experiment=consisid_release_recipe): each augmentation does what it says, the
default objective is unchanged, the optimiser and schedule are the released ones, the experiment trains."""

from __future__ import annotations

import logging
import math
from dataclasses import replace

import pytest
import torch

from consisid_lab.models import objective
from consisid_lab.models.denoiser import Conditions
from consisid_lab.models.lit_module import diff_lr_multipliers, lr_schedule
from consisid_lab.models.objective import LossSettings


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------- settings
def test_augmentations_are_off_by_default():
    s = LossSettings()
    assert (s.image_noise, s.image_dropout, s.sample_posterior, s.mask_normalisation) == (
        False,
        0.0,
        False,
        "per_sample",
    )


@pytest.mark.parametrize(
    "raw, match",
    [
        ({"mask_normalisation": "global"}, "mask_normalisation='global'.*per_sample.*batch"),
        ({"image_dropout": 1.5}, "image_dropout=1.5 must be a probability"),
        ({"image_noise": "yes"}, "image_noise='yes' must be true or false"),
        ({"image_noise_log_std": -1.0}, "image_noise_log_std=-1.0 must be >= 0"),
        ({"mask_background_weight": 1.5}, r"mask_background_weight=1.5 must be in \[0, 1\]"),
    ],
)
def test_bad_settings_are_refused_by_name(raw, match):
    with pytest.raises(ValueError, match=match):
        LossSettings.parse(raw)


# ---------------------------------------------------------------------------------------------- image noise
def test_image_noise_sigma_is_log_normal_around_exp_minus_3():
    sigma = objective.image_noise_sigma(40_000, -3.0, 0.5, _gen())
    log_sigma = sigma.log()
    assert log_sigma.mean().item() == pytest.approx(-3.0, abs=0.01)
    assert log_sigma.std().item() == pytest.approx(0.5, abs=0.01)
    assert (sigma > 0).all()
    # the median is exp(-3) ~ 0.05 in [-1, 1] image units
    assert sigma.median().item() == pytest.approx(math.exp(-3.0), rel=0.02)


def test_image_noiser_adds_each_samples_sigma_unclamped():
    sigma = torch.tensor([0.0, 0.05, 1.0])
    image = torch.full((3, 3, 64, 64), 0.9)
    out = objective.image_noiser(sigma, _gen())(image)
    assert torch.equal(out[0], image[0])
    assert (out[1] - image[1]).std().item() == pytest.approx(0.05, rel=0.05)
    assert (out[2] - image[2]).std().item() == pytest.approx(1.0, rel=0.05)
    assert out.max().item() > 1.0  # no clamping, as released


def test_image_noise_reaches_the_global_route_only(train_cfg):
    from consisid_lab.models.denoiser import build_denoiser

    cfg = train_cfg()
    denoiser = build_denoiser(cfg.model).eval()
    torch.manual_seed(0)
    face = torch.rand(2, 3, 32, 32) * 2 - 1
    kps = torch.rand(2, 5, 2) * 32
    seen = []

    def perturb(image):
        seen.append(image.shape)
        return image + 0.5

    with torch.no_grad():
        g0, tok0 = denoiser.identity(face, kps, 2)
        g1, tok1 = denoiser.identity(face, kps, 2, perturb_image=perturb)
    assert len(seen) == (2 if denoiser.uses_kps else 1)  # the face, then the keypoint image
    assert (g1 - g0).abs().max().item() > 1e-3
    assert torch.equal(tok0, tok1)  # the local encoder sees the clean face


# ---------------------------------------------------------------------------------------------- image dropout
def _cond(b: int) -> Conditions:
    return Conditions(
        text=torch.ones(b, 2, 3), global_latent=torch.ones(b, 2, 1, 1, 1), identity_tokens=torch.ones(b, 4, 3)
    )


def test_image_dropout_zeroes_the_image_latent_alone_at_its_rate():
    cond = objective.image_dropout(_cond(40_000), 0.05, _gen())
    dropped = (cond.global_latent.flatten(1).sum(1) == 0).float()
    assert dropped.mean().item() == pytest.approx(0.05, abs=0.004)
    assert torch.equal(cond.identity_tokens, torch.ones(40_000, 4, 3))
    assert torch.equal(cond.text, torch.ones(40_000, 2, 3))


def test_augmentations_that_are_off_draw_nothing():
    gen = _gen()
    state = gen.get_state()
    cond = _cond(4)
    assert objective.image_dropout(cond, 0.0, gen) is cond
    assert torch.equal(gen.get_state(), state)


def _module_and_batch(train_cfg):
    """The default composition's module and a fixed training batch."""
    from consisid_lab.utils.instantiate import instantiate

    cfg = train_cfg()
    module = instantiate(cfg.model)
    dm = instantiate(cfg.data)
    dm.setup()
    return module, dm.fixed_batch("train")


def test_default_loss_is_unchanged_by_the_switches_that_are_off(train_cfg):
    """Explicitly-off augmentations give the default loss bit for bit (the same draws in the same order)."""
    module, batch = _module_and_batch(train_cfg)
    base = replace(module.loss_settings, mask_prob=1.0)
    off = replace(base, image_noise=False, image_dropout=0.0, sample_posterior=False, mask_normalisation="per_sample")
    losses = []
    no_mask = replace(base, mask_prob=0.0)
    for settings in (base, off, no_mask, replace(no_mask, mask_normalisation="batch")):
        module.loss_settings = settings
        torch.manual_seed(0)
        losses.append(module.compute_loss(batch)[0].item())
    assert losses[0] == losses[1]
    assert losses[2] == losses[3]  # no mask this step: the normalisation does not matter
    module.loss_settings = replace(base, image_noise=True)
    assert module.compute_loss(batch)[0].item() != losses[0]


def test_mask_background_weight_runs_from_the_face_alone_to_no_mask(train_cfg):
    """``model.loss.mask_background_weight``: 0 is the paper's face-only masked step, 1 weighs the background like
    the face (the unmasked loss, bit for bit), values between give a loss of its own."""
    module, batch = _module_and_batch(train_cfg)
    masked = replace(module.loss_settings, mask_prob=1.0)
    losses = {}
    for name, settings in {
        "face": masked,
        "half": replace(masked, mask_background_weight=0.5),
        "whole": replace(masked, mask_background_weight=1.0),
        "no_mask": replace(masked, mask_prob=0.0),
    }.items():
        module.loss_settings = settings
        torch.manual_seed(0)
        losses[name] = module.compute_loss(batch)[0].item()
    assert losses["whole"] == pytest.approx(losses["no_mask"], rel=1e-6)
    assert losses["face"] != pytest.approx(losses["no_mask"], rel=1e-3)
    assert min(losses["face"], losses["no_mask"]) < losses["half"] < max(losses["face"], losses["no_mask"])


# ---------------------------------------------------------------------------------------------- mask normalisation
def test_batch_and_per_sample_mask_normalisation_numbers():
    # Two samples (1 frame, 1 channel, 1 x 4): errors 1 everywhere in sample 0, 2 in sample 1 (squared: 1 and 4).
    x0 = torch.zeros(2, 1, 1, 1, 4)
    pred = torch.stack([torch.ones(1, 1, 1, 4), torch.full((1, 1, 1, 4), 2.0)])
    mask = torch.tensor([[1.0, 0, 0, 0], [1.0, 1, 1, 0]]).view(2, 1, 1, 1, 4)  # 1 and 3 masked cells
    alphas = torch.tensor([0.5, 0.75])  # weights 2 and 4
    from consisid_lab.models.diffusion import weighted_x0_loss

    per_sample = objective.reduce_loss(weighted_x0_loss(pred, x0, alphas, mask=mask), True, "per_sample")
    # per sample: (2 * 1 + 4 * 4) / 2 = 9
    assert per_sample.item() == pytest.approx(9.0)
    terms = objective.batch_masked_loss(pred, x0, alphas, mask)
    # over the batch: (2 * 1 * 1 + 4 * 4 * 3) / (1 + 3) = 50 / 4 = 12.5 (the larger face weighs more)
    assert terms.tolist() == pytest.approx([0.5, 12.0])
    assert objective.reduce_loss(terms, True, "batch").item() == pytest.approx(12.5)
    # all masks empty: the unmasked mean, as with per-sample normalisation
    empty = objective.batch_masked_loss(pred, x0, alphas, torch.zeros_like(mask))
    assert empty.sum().item() == pytest.approx((2 * 1 + 4 * 4) / 2)


# ---------------------------------------------------------------------------------------------- posterior sampling
def test_posterior_sampling_draws_from_a_real_vae_and_says_so_for_the_others(tmp_path, caplog):
    from test_components_conditioning import _tiny_cogvideox_vae

    from consisid_lab.models.vae import CogVideoXCodec, PixelCodec

    _tiny_cogvideox_vae(tmp_path)
    codec = CogVideoXCodec(str(tmp_path), subfolder="vae")
    video = torch.rand(1, 9, 3, 16, 16) * 2 - 1
    on = LossSettings(sample_posterior=True)
    mean = codec.encode(video)
    with objective.posterior_sampling(codec, on, seed=0, step=3) as sampled:
        a = codec.encode(video)
    with objective.posterior_sampling(codec, on, seed=0, step=3):
        b = codec.encode(video)
    with objective.posterior_sampling(codec, on, seed=0, step=4):
        c = codec.encode(video)
    assert sampled
    assert torch.equal(a, b)  # a function of (seed, step): exact resume
    assert (a - mean).abs().max().item() > 1e-4 and (a - c).abs().max().item() > 1e-4
    assert torch.equal(codec.encode(video), mean)  # outside: the mean again
    with objective.posterior_sampling(codec, LossSettings(), seed=0, step=3) as sampled:
        assert not sampled
        assert torch.equal(codec.encode(video), mean)

    pixel = PixelCodec(spatial_factor=4)
    with caplog.at_level(logging.WARNING), objective.posterior_sampling(pixel, on, seed=0, step=0) as sampled:
        assert not sampled
    assert "PixelCodec) has no posterior" in caplog.text
    with (
        pytest.raises(ValueError, match="PixelCodec has no posterior.*model/vae=cogvideox"),
        pixel.posterior_sampling(torch.Generator()),
    ):
        pass


# ---------------------------------------------------------------------------------------------- optimiser
def test_warmup_then_cosine_with_restarts_shape():
    f = lr_schedule("cosine_with_restarts", warmup_steps=200, total_steps=1200, num_cycles=1)
    assert f(0) == pytest.approx(1 / 200)
    assert f(99) == pytest.approx(0.5)
    assert f(199) == pytest.approx(1.0)
    assert f(200) == pytest.approx(1.0)
    assert f(700) == pytest.approx(0.5)  # half way through the decay
    assert f(1199) == pytest.approx(0.0, abs=1e-4)
    assert f(1200) == 0.0
    values = [f(s) for s in range(200, 1200)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # one cycle: monotone decay

    g = lr_schedule("cosine_with_restarts", warmup_steps=200, total_steps=1200, num_cycles=2)
    assert g(450) == pytest.approx(0.5)  # the first cycle's midpoint
    assert g(699) == pytest.approx(0.0, abs=1e-3)  # the first cycle ends near 0
    assert g(700) == pytest.approx(1.0)  # the restart
    assert g(950) == pytest.approx(0.5)
    assert lr_schedule("constant", 0, 10)(5) == 1.0
    with pytest.raises(ValueError, match="schedule='linear'"):
        lr_schedule("linear", 0, 10)


def test_release_recipe_optimiser_and_diff_lr(train_cfg):
    import lightning.pytorch as pl

    from consisid_lab.utils.instantiate import instantiate

    cfg = train_cfg("+experiment=consisid_release_recipe", "model.optimizer.diff_lr=true")
    module = instantiate(cfg.model)
    module.trainer = pl.Trainer(max_steps=1000, logger=False, enable_checkpointing=False, accelerator="cpu")
    out = module.configure_optimizers()
    opt, sched = out["optimizer"], out["lr_scheduler"]["scheduler"]
    assert isinstance(opt, torch.optim.AdamW)
    groups = {g["name"]: g for g in opt.param_groups}
    for g in groups.values():
        assert g["betas"] == (0.9, 0.95) and g["weight_decay"] == pytest.approx(1e-4)
    # the base rates (the scheduler already applied the first warm-up factor, 1/200, to "lr")
    assert groups["backbone.injector"]["initial_lr"] == pytest.approx(3e-5)  # identity cross-attention x10
    assert groups["backbone"]["initial_lr"] == pytest.approx(3e-7)  # the rest x0.1
    assert groups["fuser"]["initial_lr"] == pytest.approx(3e-7)
    assert groups["backbone.injector"]["lr"] == pytest.approx(3e-5 / 200)
    assert "text_encoder" not in groups  # the whole transformer trains, the text encoder does not
    assert sched.lr_lambdas[0](0) == pytest.approx(1 / 200)
    assert sched.lr_lambdas[0](600) == pytest.approx(0.5)
    assert diff_lr_multipliers({"diff_lr": False}) == {}


# ---------------------------------------------------------------------------------------------- the experiment
def test_release_recipe_composes_and_trains_two_steps(train_cfg, caplog):
    import json
    from pathlib import Path

    from consisid_lab.train import train
    from consisid_lab.utils.instantiate import instantiate

    cfg = train_cfg("+experiment=consisid_release_recipe", "trainer.max_steps=2", "test=false")
    loss = cfg.model.loss
    assert (loss.image_noise, loss.image_dropout, loss.sample_posterior, loss.text_dropout) == (True, 0.05, True, 0.0)
    assert loss.mask_normalisation == "batch"
    assert cfg.model.injector.zero_init is False and cfg.model.injector.interval == 2  # the consisid composition
    opt = cfg.model.optimizer
    assert (opt.lr, list(opt.betas), opt.weight_decay, opt.warmup_steps, opt.schedule) == (
        3e-6,
        [0.9, 0.95],
        1e-4,
        200,
        "cosine_with_restarts",
    )
    module = instantiate(cfg.model)
    out_weights = [layer.to_out.weight for layer in module.denoiser.backbone.injector.layers]
    assert all(w.abs().sum() > 0 for w in out_weights)  # default init, not zero
    with caplog.at_level(logging.WARNING):
        train(cfg)
    record = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert record["status"] == "completed" and record["experiment"] == "consisid_release_recipe"
    objective._warned_no_posterior.discard("StandInCodec")
    assert "has no posterior" in caplog.text or "StandInCodec" in caplog.text


def test_generate_samples_published_models_with_dynamic_cfg_off_as_released():
    import inspect

    from conftest import CONF
    from omegaconf import OmegaConf

    from consisid_lab.generate import sample_published

    assert OmegaConf.load(CONF / "generate.yaml").published.use_dynamic_cfg is False
    assert inspect.signature(sample_published).parameters["use_dynamic_cfg"].default is False
