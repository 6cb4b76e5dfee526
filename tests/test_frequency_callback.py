"""FrequencyAnalysisCallback on a tiny LightningModule that implements the analysis contract."""

from __future__ import annotations

import csv
import json

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from diffusers import CogVideoXTransformer3DModel
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from consisid_lab.analysis import SCALAR_NAMES, SpectrumResult
from consisid_lab.callbacks import FrequencyAnalysisCallback
from consisid_lab.callbacks.frequency import DEFAULT_PATTERNS, activation_to_maps
from consisid_lab.types import VideoBatch

B, FRAMES, LATENT_FRAMES, H, W = 2, 3, 2, 16, 16
LAT_C, LAT_HW, PATCH, TEXT_LEN, DIM = 4, 8, 2, 3, 16
H_TOK = W_TOK = LAT_HW // PATCH


def _batch(seed: int) -> VideoBatch:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(B, FRAMES, 1, H, W)
    mask[..., 4:12, 3:11] = 1
    ref_mask = torch.zeros(B, 1, H, W)
    ref_mask[..., 2:14, 2:14] = 1
    return VideoBatch(
        video=torch.rand(B, FRAMES, 3, H, W, generator=g) * 2 - 1,
        caption=["a face"] * B,
        ref_face=torch.rand(B, 3, H, W, generator=g) * 2 - 1,
        ref_kps=torch.zeros(B, 5, 2),
        ref_mask=ref_mask,
        intra_face=torch.zeros(B, 3, H, W),
        intra_kps=torch.zeros(B, 5, 2),
        intra_mask=torch.zeros(B, 1, H, W),
        kps=torch.zeros(B, FRAMES, 5, 2),
        face_mask=mask,
        boxes=torch.zeros(B, FRAMES, 4),
        identity=torch.arange(B),
        clip_id=torch.arange(B),
    )


class TinyModule(pl.LightningModule):
    """Implements analysis_batch / denoise_once / token_layout / last_samples around a tiny CogVideoX DiT."""

    def __init__(self) -> None:
        super().__init__()
        self.denoiser = nn.Module()
        self.denoiser.backbone = nn.Module()
        self.denoiser.backbone.transformer = CogVideoXTransformer3DModel(
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=LAT_C,
            out_channels=LAT_C,
            time_embed_dim=8,
            text_embed_dim=DIM,
            num_layers=2,
            sample_width=LAT_HW,
            sample_height=LAT_HW,
            sample_frames=(LATENT_FRAMES - 1) * 4 + 1,
            patch_size=PATCH,
            max_text_seq_length=TEXT_LEN,
        )
        self.denoiser.injector = nn.Module()
        self.denoiser.injector.layers = nn.ModuleList([nn.Linear(DIM, DIM)])
        # a module that sees the joint [text; video] sequence, to exercise dropping text tokens
        self.denoiser.joint = nn.Identity()
        self.text = nn.Parameter(torch.randn(1, TEXT_LEN, DIM))
        self.last_samples: dict = {}
        self.denoise_calls: list[int] = []

    token_layout = (TEXT_LEN, LATENT_FRAMES, H_TOK, W_TOK)

    def analysis_batch(self) -> VideoBatch:
        return _batch(seed=0)

    def _forward(self, latents: torch.Tensor, timestep: int) -> torch.Tensor:
        tr = self.denoiser.backbone.transformer
        out = tr(
            latents,
            self.text.expand(latents.shape[0], -1, -1),
            torch.full((latents.shape[0],), timestep),
            return_dict=False,
        )[0]
        video_tokens = torch.randn(latents.shape[0], LATENT_FRAMES * H_TOK * W_TOK, DIM)
        self.denoiser.injector.layers[0](video_tokens)
        self.denoiser.joint(torch.cat([self.text.expand(latents.shape[0], -1, -1), video_tokens], dim=1))
        return out

    def denoise_once(self, batch: VideoBatch, timestep: int) -> None:
        self.denoise_calls.append(timestep)
        g = torch.Generator().manual_seed(1234)
        self._forward(torch.randn(batch.batch_size, LATENT_FRAMES, LAT_C, LAT_HW, LAT_HW, generator=g), timestep)

    def training_step(self, batch, batch_idx):
        return self._forward(batch[0], 500).square().mean()

    def validation_step(self, batch, batch_idx):
        b = _batch(seed=batch_idx + 1)
        self.last_samples = {"video": b.video, "face_mask": b.face_mask, "ref_face": b.ref_face}

    test_step = validation_step

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def _loader() -> DataLoader:
    return DataLoader(TensorDataset(torch.randn(2, LATENT_FRAMES, LAT_C, LAT_HW, LAT_HW)), batch_size=2)


def test_activation_to_maps_infers_text_tokens():
    video = torch.randn(B, LATENT_FRAMES * H_TOK * W_TOK, DIM)
    joint = torch.cat([torch.randn(B, TEXT_LEN, DIM), video], dim=1)
    layout = (TEXT_LEN, LATENT_FRAMES, H_TOK, W_TOK)
    torch.testing.assert_close(activation_to_maps(joint, layout), activation_to_maps(video, layout))
    assert activation_to_maps(video, layout).shape == (B * LATENT_FRAMES, DIM, H_TOK, W_TOK)
    with pytest.raises(ValueError, match="token_layout"):
        activation_to_maps(video[:, 1:], layout)


def test_callback_writes_spectra_figures_and_scalars(tmp_path):
    torch.manual_seed(0)
    module = TinyModule()
    patterns = [*DEFAULT_PATTERNS, r"denoiser\.joint", r"denoiser\.missing\.\d+"]
    callback = FrequencyAnalysisCallback(patterns=patterns, every_n_val_epochs=2, timesteps=[800, 200], face_size=8)
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        max_epochs=2,
        limit_train_batches=1,
        limit_val_batches=1,
        logger=[CSVLogger(tmp_path, name="csv"), TensorBoardLogger(tmp_path, name="tb")],
        callbacks=[callback],
        accelerator="cpu",
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=1,
    )
    trainer.fit(module, _loader(), _loader())
    spectra = tmp_path / "spectra"
    # every 2nd validation epoch: only epoch 1 (the sanity check does not count)
    assert sorted(p.name for p in spectra.iterdir()) == [f"epoch_001_step_{trainer.global_step:07d}"]
    assert module.denoise_calls == [800, 200]
    assert module.training, "the callback restores train mode"
    epoch = spectra / f"epoch_001_step_{trainer.global_step:07d}"
    for t in (800, 200):
        for name in (
            "backbone.transformer.transformer_blocks.0",
            "backbone.transformer.transformer_blocks.1",
            "injector.layers.0",
            "joint",
        ):
            result = SpectrumResult.from_npz(epoch / f"t{t:04d}__{name}.npz")
            assert result.log_amp.shape == (H_TOK, W_TOK)  # tokens reshaped to the latent token grid
            assert result.count == B * LATENT_FRAMES * DIM
            assert set(result.scalars) == set(SCALAR_NAMES)
        assert (epoch / f"maps_t{t:04d}.png").stat().st_size > 0
        assert (epoch / f"curves_t{t:04d}.png").stat().st_size > 0
    # the two transformer blocks see different activations, so their spectra differ
    b0 = SpectrumResult.from_npz(epoch / "t0800__backbone.transformer.transformer_blocks.0.npz")
    b1 = SpectrumResult.from_npz(epoch / "t0800__backbone.transformer.transformer_blocks.1.npz")
    assert not np.allclose(b0.log_amp, b1.log_amp)
    faces = SpectrumResult.from_npz(epoch / "generated_faces.npz")
    assert faces.log_amp.shape == (8, 8)
    assert faces.count == B * FRAMES  # one grayscale crop per frame
    # the samples carry no reference mask: the analysis batch's reference is cropped with its own mask
    assert SpectrumResult.from_npz(epoch / "reference_face.npz").count == B
    assert (epoch / "faces.png").exists()
    scalars = json.loads((epoch / "scalars.json").read_text())
    key = "freq/t0800/backbone.transformer.transformer_blocks.1/hf_ratio_025"
    assert scalars[key] == pytest.approx(b1.scalars["hf_ratio_025"])
    assert 0 < scalars["freq/generated_faces/hf_ratio_025"] < 1
    assert not (spectra / "generated_faces.npz").exists()

    trainer.test(module, _loader(), verbose=False)
    assert (spectra / "test" / "scalars.json").exists()
    final = SpectrumResult.from_npz(spectra / "generated_faces.npz")
    # test-time face scalars join the test metrics that the task writes to metrics.json
    assert trainer.callback_metrics["freq/generated_faces/hf_ratio_025"].item() == pytest.approx(
        final.scalars["hf_ratio_025"]
    )
    assert final.scalars == {
        k.rsplit("/", 1)[1]: v for k, v in callback.latest_scalars.items() if k.startswith("freq/generated_faces/")
    }

    with open(next((tmp_path / "csv").rglob("metrics.csv"))) as f:
        rows = list(csv.DictReader(f))
    logged = [r for r in rows if r.get(key)]
    assert any((tmp_path / "tb").rglob("events.out.tfevents.*"))
    assert logged and float(logged[0][key]) == pytest.approx(b1.scalars["hf_ratio_025"])


def test_callback_rejects_patterns_matching_nothing(tmp_path):
    callback = FrequencyAnalysisCallback(patterns=[r"no\.such\.module"], timesteps=[500])
    with pytest.raises(ValueError, match="none of the patterns"):
        callback.matched_modules(TinyModule())


def test_without_figures_the_spectra_and_scalars_are_written_and_no_png(tmp_path):
    torch.manual_seed(0)
    module = TinyModule()
    callback = FrequencyAnalysisCallback(every_n_val_epochs=1, timesteps=[800], face_size=8, figures=False)
    trainer = pl.Trainer(
        default_root_dir=tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=1, logger=False,
        callbacks=[callback], accelerator="cpu", enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(module, _loader(), _loader())
    (epoch,) = (tmp_path / "spectra").iterdir()
    names = {p.name for p in epoch.iterdir()}
    assert "scalars.json" in names and "generated_faces.npz" in names
    assert "t0800__backbone.transformer.transformer_blocks.0.npz" in names
    assert not [n for n in names if n.endswith(".png")]


def test_a_rendered_figure_is_drawn_once_and_its_png_holds_the_returned_pixels(tmp_path, monkeypatch):
    import numpy as np
    from PIL import Image

    from consisid_lab.analysis.plots import new_figure, render_figure

    fig = new_figure(3.0, 2.0)
    fig.subplots().plot([0, 1, 2], [2, 0, 1])
    draws = []
    draw = fig.canvas.draw
    monkeypatch.setattr(fig.canvas, "draw", lambda *a, **k: (draws.append(1), draw(*a, **k))[1])
    rgb = render_figure(fig, tmp_path / "sub" / "fig.png")
    assert len(draws) == 1
    assert rgb.shape == (200, 300, 3) and rgb.dtype == np.uint8 and rgb.std() > 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "sub" / "fig.png").convert("RGB")), rgb)
