"""The training task end to end: every experiment composes and runs, outputs, resume, faults, sweeps."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CONF, ROOT, TINY_OVERRIDES
from hydra.errors import ConfigCompositionException

from consisid_lab.train import train

# from_base needs a base directory (base_dir=DIR) and keeps the experiment name it is combined with: its run is
# tests/test_export.py::test_a_trained_base_exports_its_backbone_and_a_fine_tune_trains_from_it.
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml") if p.stem != "from_base")


def _losses(run_dir: Path) -> dict[int, float]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}


def test_experiment_list_is_complete():
    required = {
        "consisid", "full", "no_global", "no_local", "no_keypoints", "arcface_only", "clip_only", "arcface_last",
        "arcface_penultimate", "fuser_mlp", "inject_between_attn_ffn", "inject_attn_input", "no_mask_loss",
        "no_cross_face",
    }  # fmt: skip
    assert required <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_trains_and_tests(experiment, train_cfg):
    cfg = train_cfg(f"+experiment={experiment}")
    metrics = train(cfg)
    out = Path(cfg.paths.output_dir)
    record = json.loads((out / "metrics.json").read_text())
    assert record["status"] == "completed"
    assert record["experiment"] == experiment
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert (out / "config_resolved.yaml").is_file()
    assert 0.0 <= metrics["test/facesim"] <= 1.0
    for key in (
        "test/facesim_shuffled",
        "test/fid",
        "test/face_rate",
        "test/facesim_real_shuffled",
        "test/copy_paste",
    ):
        assert key in record["metrics"], key
    assert record["components"]["backbone"] == "tiny"
    # The reference's latent layout is recorded, so a report keeps the two layouts in separate rows.
    layout = {"reference_every_frame": "all", "no_global": None, "no_global_zeroed": None}.get(experiment, "first")
    assert record["components"].get("face_frames") == layout
    # The footprint: last.ckpt only (a checkpoint was due at every step of this run).
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["last.ckpt"]
    # Samples are evidence: what the model made, as uint8 arrays beside the contact sheet.
    samples = np.load(out / "media" / "test_samples.npz")
    assert samples["generated"].dtype == np.uint8 and samples["generated"].shape == samples["real"].shape
    b, f, h, w, c = samples["generated"].shape
    assert (f, h, w, c) == (cfg.data.num_frames, cfg.data.height, cfg.data.width, 3)
    assert (out / "media" / "val_samples.npz").is_file()


def test_composition_matches_experiment(train_cfg):
    from consisid_lab.models.injector import CrossAttentionInjector, NoInjector
    from consisid_lab.utils.instantiate import instantiate

    consisid = instantiate(train_cfg("+experiment=consisid").model)
    assert isinstance(consisid.denoiser.backbone.injector, CrossAttentionInjector)
    assert (
        consisid.denoiser.backbone.injector.position == "after_block"
        and consisid.denoiser.backbone.injector.interval == 2
    )
    assert not consisid.denoiser.global_encoder.use_kps
    assert set(consisid.denoiser.local_encoder.vector_dims) == {"arcface", "clip"}
    assert "arcface_penultimate" not in consisid.denoiser.local_encoder.token_dims
    full = instantiate(train_cfg("+experiment=full").model)
    assert full.denoiser.backbone.injector.position == "between_attn_ffn" and full.denoiser.global_encoder.use_kps
    assert "arcface_penultimate" in full.denoiser.local_encoder.token_dims
    # in_channels follow the global encoder: latent + face latent channels, or latent only without it.
    assert full.denoiser.backbone.in_channels == 2 * full.denoiser.vae.latent_channels
    no_global = instantiate(train_cfg("+experiment=no_global").model)
    assert no_global.denoiser.backbone.in_channels == no_global.denoiser.vae.latent_channels
    # The zeroed variant keeps the channels (a base backbone's shape) and puts no face in them.
    zeroed = instantiate(train_cfg("+experiment=no_global_zeroed").model).denoiser
    assert zeroed.backbone.in_channels == 2 * zeroed.vae.latent_channels and not zeroed.uses_kps
    face, kps = torch.rand(2, 3, 64, 64) * 2 - 1, torch.rand(2, 5, 2) * 64
    g = zeroed.global_latent(face, kps, num_latent_frames=3)
    assert g.shape == (2, 3, zeroed.vae.latent_channels, 16, 16) and not g.any()
    assert full.denoiser.global_latent(face, kps, num_latent_frames=3).abs().sum() > 0
    no_local = instantiate(train_cfg("+experiment=no_local").model)
    assert isinstance(no_local.denoiser.backbone.injector, NoInjector) and no_local.denoiser.fuser is None


def test_unknown_choice_lists_the_options(train_cfg):
    with pytest.raises(ConfigCompositionException, match="perceiver"):
        train_cfg("model/fuser=foo")


def test_incompatible_combinations_fail_before_training(train_cfg):
    from consisid_lab.utils.instantiate import instantiate

    with pytest.raises(ValueError, match="use_kps"):
        instantiate(train_cfg("model/keypoint_renderer=none", "model.global_encoder.use_kps=true").model)
    with pytest.raises(ValueError, match="model/fuser=mlp"):
        instantiate(train_cfg("model/local_encoder=arcface", "model.local_encoder.arcface_layer=last").model)
    with pytest.raises(ValueError, match="no identity route"):
        instantiate(train_cfg("model/global_encoder=none", "model/local_encoder=none", "model/injector=none").model)
    with pytest.raises(ValueError, match="global_encoder=zero_latent and model/local_encoder=none leave no identity"):
        instantiate(train_cfg("+experiment=[no_global_zeroed,no_local]").model)


def test_resume_reproduces_the_loss_curve(tmp_path, standin_cache):
    from conftest import compose_train

    common = ["trainer.val_check_interval=100", "test=false", "callbacks.checkpoint.every_n_train_steps=1"]
    full = compose_train([*common, "trainer.max_steps=6"], tmp_path / "full", standin_cache)
    train(full)
    first = compose_train([*common, "trainer.max_steps=3"], tmp_path / "first", standin_cache)
    train(first)
    resumed = compose_train(
        [*common, "trainer.max_steps=6", f"ckpt_path={tmp_path / 'first'}"], tmp_path / "resumed", standin_cache
    )
    train(resumed)
    uninterrupted, continued = _losses(tmp_path / "full"), _losses(tmp_path / "resumed")
    # the resumed run continues the global step; its CSV log starts with the first run's steps
    assert sorted(continued) == [0, 1, 2, 3, 4, 5]
    assert {s: v for s, v in continued.items() if s < 3} == _losses(tmp_path / "first")
    for step in continued:
        assert continued[step] == pytest.approx(uninterrupted[step], rel=1e-6, abs=1e-7)
    ckpt = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 6
    assert ckpt["run_config"]["experiment_name"] == "full"


def test_eval_task_reproduces_test_metrics(train_cfg, tmp_path, standin_cache):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from consisid_lab.eval import evaluate

    cfg = train_cfg("trainer.max_steps=2")
    trained = train(cfg)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        ecfg = compose(
            "eval",
            overrides=[
                f"ckpt_path={cfg.paths.output_dir}",
                f"paths.cache_dir={standin_cache}",
                "standins_recipe=tiny",
            ],
            return_hydra_config=True,
        )
    with open_dict(ecfg):
        ecfg.hydra.runtime.output_dir = str(tmp_path / "eval")
        ecfg.hydra.job.num = 0
    HydraConfig.instance().set_config(ecfg)
    evaluated = evaluate(ecfg)
    # Same weights (the EMA stored in the checkpoint), same test clips, same sampling seeds: same numbers.
    for key in ("test/facesim", "test/facesim_shuffled", "test/fid", "test/loss"):
        assert evaluated[key] == pytest.approx(trained[key], rel=1e-4, abs=1e-5), key


def test_wandb_logs_offline_under_the_run_dir(train_cfg, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", "/nonexistent")
    cfg = train_cfg("logger=wandb", "trainer.max_steps=2")
    train(cfg)
    runs = list((Path(cfg.paths.output_dir) / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("run-*.wandb"))
    assert list((runs[0] / "files" / "media").rglob("*.mp4")), "sample videos are logged as mp4"


# Slow (31 s): tests/test_faults.py's segfaulting sweep is the fast representative of a sweep surviving a member.
@pytest.mark.slow
def test_multirun_survives_a_failing_member(tmp_path, standin_cache):
    env = {**os.environ, "CONSISID_LAB_CACHE": str(standin_cache), "WANDB_MODE": "offline"}
    cmd = [
        sys.executable, "-m", "consisid_lab.train", "-m", *TINY_OVERRIDES, "trainer.max_steps=2", "test=false",
        f"paths.cache_dir={standin_cache}", f"hydra.sweep.dir={tmp_path / 'sweep'}",
        "model.nan_policy=bogus,skip",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    statuses = {}
    for member in sorted((tmp_path / "sweep").iterdir()):
        if (member / "metrics.json").is_file():
            statuses[member.name] = json.loads((member / "metrics.json").read_text())
    assert [s["status"] for s in statuses.values()] == ["failed", "completed"]
    assert "nan_policy" in statuses["0"]["error"]


def test_coarse_to_fine_trains_the_local_route_only_in_the_fine_stage(train_cfg):
    from consisid_lab.utils.instantiate import instantiate

    def injector_out(model) -> float:
        return sum(layer.to_out.weight.abs().sum().item() for layer in model.denoiser.backbone.injector.layers)

    coarse = train_cfg(
        "+experiment=coarse_to_fine", "trainer.max_steps=1", "test=false", "model.stages.0.until=5",
        "data.num_frames=9", "model.backbone.config.sample_frames=9",
    )  # fmt: skip
    model = instantiate(coarse.model)
    seen_frames = []
    original = model.compute_loss
    model.compute_loss = lambda batch: (seen_frames.append(batch.video.shape[1]), original(batch))[1]
    block_before = model.denoiser.backbone.transformer.transformer_blocks[0].ff.net[2].weight.detach().clone()
    trainer = instantiate(coarse.trainer, logger=False, callbacks=[])
    trainer.fit(model, datamodule=instantiate(coarse.data))
    assert injector_out(model) == 0.0, "the zero-initialised injector stays frozen in the coarse stage"
    assert seen_frames == [5], "the coarse stage trains on its shorter clips"
    assert not torch.equal(block_before, model.denoiser.backbone.transformer.transformer_blocks[0].ff.net[2].weight)

    # until <= 1 is a fraction of max_steps: round(0.34 * 3) = step 1 starts the fine stage.
    fine = train_cfg("+experiment=coarse_to_fine", "trainer.max_steps=3", "test=false", "model.stages.0.until=0.34")
    model = instantiate(fine.model)
    trainer = instantiate(fine.trainer, logger=False, callbacks=[])
    trainer.fit(model, datamodule=instantiate(fine.data))
    assert injector_out(model) > 0.0, "the fine stage trains the identity cross-attention"
    lrs = {g["name"]: g["lr"] for g in trainer.optimizers[0].param_groups}
    assert lrs["backbone.injector"] == pytest.approx(2 * lrs["backbone"])


def test_lora_and_identity_only_train_the_declared_sets(train_cfg):
    from consisid_lab.utils.instantiate import instantiate

    lora = instantiate(train_cfg("+experiment=lora").model)
    trainable = [n for n, p in lora.denoiser.named_parameters() if p.requires_grad]
    assert any("lora_" in n for n in trainable)
    assert all("lora_" in n or n.startswith(("fuser.", "backbone.injector.", "text_encoder.")) for n in trainable), (
        trainable
    )
    ident = instantiate(train_cfg("+experiment=identity_only").model)
    trainable = {n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("backbone.") else "")
                 for n, p in ident.denoiser.named_parameters() if p.requires_grad}  # fmt: skip
    assert trainable == {"fuser", "backbone.injector"}
