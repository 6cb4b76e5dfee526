"""The frozen-encoder memo of the training clips: same loss as encoding every step, and used only where it applies."""

from __future__ import annotations

from dataclasses import replace
from itertools import islice

import pytest
import torch

from consisid_lab.models import objective
from consisid_lab.models.frozen_memo import FrozenFeatureMemo, memo_unavailable
from consisid_lab.utils.instantiate import instantiate


@pytest.fixture
def parts(train_cfg):
    cfg = train_cfg("data.num_train_identities=3", "data.clips_per_identity=2", "data.batch_size=4")
    torch.manual_seed(0)
    model = instantiate(cfg.model)
    dm = instantiate(cfg.data)
    dm.setup("fit")
    return model, dm


def test_memoised_loss_equals_the_loss_encoded_every_step(parts) -> None:
    model, dm = parts
    dataset = dm.dataset("train")
    memo = FrozenFeatureMemo.build(model.denoiser, dataset, batch_size=4)
    assert sorted(memo.latents) == list(range(len(dataset)))
    for step, batch in enumerate(islice(iter(dm.train_dataloader()), 3)):
        assert memo.covers(batch)
        x0 = model._latents(batch)
        torch.testing.assert_close(memo.video_latents(batch), x0, atol=1e-5, rtol=1e-5)
        settings = replace(model.loss_settings, cross_face_prob=0.5)
        plain, _ = objective.training_loss(
            model.denoiser, model.noise_scheduler, batch, x0, settings, objective.step_generator(0, step)
        )
        memoised, _ = objective.training_loss(
            model.denoiser, model.noise_scheduler, batch, x0, settings, objective.step_generator(0, step), memo=memo
        )
        torch.testing.assert_close(memoised, plain, atol=1e-5, rtol=1e-5)


def test_memo_is_refused_where_values_change_every_step(parts) -> None:
    model, dm = parts
    dataset = dm.dataset("train")
    assert memo_unavailable(dataset, model.loss_settings) is None
    assert "sample_posterior" in memo_unavailable(dataset, replace(model.loss_settings, sample_posterior=True))
    assert "image_noise" in memo_unavailable(dataset, replace(model.loss_settings, image_noise=True))
    assert "synthetic" in memo_unavailable(list(dataset), model.loss_settings)
    # A clip length other than the memo's (a coarse-to-fine stage) is not covered: encoded every step.
    memo = FrozenFeatureMemo.build(model.denoiser, dataset, batch_size=4)
    batch = next(iter(dm.train_dataloader()))
    assert not memo.covers(replace(batch, video=batch.video[:, :1]))
    assert not memo.covers(replace(batch, clip_id=batch.clip_id + 1000))
    # A corrupt (non-finite) video is encoded as it is, so the loss shows it.
    assert memo.covers(batch) and not memo.covers(replace(batch, video=batch.video.clone().fill_(float("nan"))))


def test_training_builds_the_memo_once_and_logs_it(train_cfg, caplog) -> None:
    import logging

    from consisid_lab.train import train

    cfg = train_cfg("data.num_train_identities=2", "data.clips_per_identity=2", "trainer.max_steps=2", "test=false")
    with caplog.at_level(logging.INFO, logger="consisid_lab.models.frozen_memo"):
        train(cfg)
    assert sum("frozen encoder outputs of 4 training clips" in r.getMessage() for r in caplog.records) == 1
