"""Frequency analysis of hooked activations and of generated faces during training and testing.

Contract with the LightningModule (all three are read only when the analysis runs):

- ``analysis_batch() -> VideoBatch``: the same fixed batch on every call;
- ``denoise_once(batch, timestep: int) -> None``: one denoiser forward at ``timestep`` with a fixed noise seed;
  the forward hooks registered here see the activations;
- ``token_layout -> (num_text_tokens, latent_frames, h_tokens, w_tokens)``: how ``(B, L, C)`` token outputs map
  to space (``L`` is either the video tokens alone or ``[text; video]``);
- ``last_samples: dict`` (optional, set by validation / test sampling): ``video`` ``(B, F, 3, H, W)`` in
  [-1, 1], ``face_mask`` ``(B, F, 1, H, W)``, ``ref_face`` ``(B, 3, H, W)``, optionally ``ref_mask``
  ``(B, 1, H, W)``.

The analysis runs in ``on_validation_end`` / ``on_test_end``, i.e. after the module's own epoch-end hooks, so
samples stored there are seen. Spectra depend on the noise level, hence the fixed batch and timesteps.
Outputs, under ``<out_dir>/epoch_XXX_step_XXXXXXX/`` (``<out_dir>/test/`` at test end; a relative ``out_dir``
is resolved against ``trainer.default_root_dir``): one ``.npz`` per tensor (``SpectrumResult``),
``maps_tXXXX.png``, ``curves_tXXXX.png``, ``faces.png`` and ``scalars.json``. At test end the generated-face
spectrum is also copied to ``<out_dir>/generated_faces.npz``, which ``consisid_lab.analyze`` reads, and the face
scalars (``freq/generated_faces/*``, ``freq/reference_face/*``) join ``trainer.callback_metrics``.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor, nn

from consisid_lab.analysis.face_crops import crop_faces
from consisid_lab.analysis.spectrum import DEFAULT_EPS, SpectrumAccumulator, SpectrumResult, compute_spectrum
from consisid_lab.analysis.spectrum import tokens_to_maps as _tokens_to_maps
from consisid_lab.utils.faults import NonFiniteInputError, nonfinite_summary, report_failure

log = logging.getLogger(__name__)

# DiT block outputs and injector outputs, wherever the backbone / injector sit in the module tree
# (``backbone.transformer.transformer_blocks.3`` on the LightningModule, ``denoiser.backbone...`` when wrapped)
DEFAULT_PATTERNS = (
    r"(?:.+\.)?backbone\.transformer\.transformer_blocks\.\d+",
    r"(?:.+\.)?injector\.layers\.\d+",
)
DEFAULT_TIMESTEPS = (900, 500, 100)
GENERATED_FACES = "generated_faces"
REFERENCE_FACE = "reference_face"
GENERATED_FACES_FILE = f"{GENERATED_FACES}.npz"


def _first_tensor(output: Any) -> Tensor | None:
    """The hooked value: a tensor, or the first element of a tuple (diffusers blocks return (video, text))."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    return None


def activation_to_maps(x: Tensor, token_layout: Sequence[int]) -> Tensor:
    """Any hooked activation as ``(N, C, h, w)`` maps.

    ``(N, C, h, w)`` passes through, ``(B, F, C, h, w)`` is flattened, ``(B, L, C)`` tokens are reshaped with
    ``token_layout = (num_text_tokens, frames, h, w)``; text tokens are dropped when ``L`` includes them.
    """
    if x.ndim == 4:
        return x
    if x.ndim == 5:
        return x.flatten(0, 1)  # (B*F, C, h, w)
    if x.ndim != 3:
        raise ValueError(f"cannot analyse an activation of shape {tuple(x.shape)}: expected 3-D tokens or 4/5-D maps")
    num_text, frames, h, w = (int(v) for v in token_layout)
    video = frames * h * w
    length = x.shape[1]
    if length == video:
        return _tokens_to_maps(x, frames, h, w, 0)
    if length == num_text + video:
        return _tokens_to_maps(x, frames, h, w, num_text)
    raise ValueError(
        f"token sequence of length {length} fits neither {frames}x{h}x{w} = {video} video tokens nor "
        f"{num_text} text + {video} video tokens; check the module's token_layout {tuple(token_layout)}"
    )


def _short_names(names: Sequence[str]) -> dict[str, str]:
    """Module names without their common dotted prefix (``denoiser.``), to keep logged keys readable.

    A single name keeps its last two components (``transformer_blocks.3``).
    """
    names = list(dict.fromkeys(names))
    parts = [n.split(".") for n in names]
    if len(parts) == 1:
        return {names[0]: ".".join(parts[0][-2:])}
    common = 0
    while all(len(p) > common + 1 for p in parts) and len({p[common] for p in parts}) == 1:
        common += 1
    return {n: ".".join(p[common:]) for n, p in zip(names, parts)}


def _common_prefix(names: Sequence[str]) -> str:
    """Shared leading dotted components of several names (a lone name is its own prefix)."""
    if len(names) == 1:
        return names[0]
    parts = [n.split(".") for n in names]
    shortest = min(len(p) for p in parts)
    common = 0
    while common < shortest - 1 and len({p[common] for p in parts}) == 1:
        common += 1
    return ".".join(parts[0][:common])


def _file_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "__", name)


class _SpectrumHook:
    """Forward hook feeding a module's output into a spectrum as it is produced (activations are not kept)."""

    def __init__(self, name: str, accumulator: SpectrumAccumulator, token_layout: Sequence[int]) -> None:
        self.name = name
        self.accumulator = accumulator
        self.token_layout = token_layout

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        x = _first_tensor(output)
        if x is None:
            raise ValueError(
                f"frequency analysis: module {self.name!r} returned {type(output).__name__}, not a tensor or a "
                "tuple starting with one; drop it from the patterns"
            )
        self.accumulator.update(activation_to_maps(x, self.token_layout))


class FrequencyAnalysisCallback(pl.Callback):
    """Spectra of hooked activations (at fixed timesteps on a fixed batch) and of reference / generated faces.

    Args:
        patterns: regular expressions, each matched in full against ``pl_module.named_modules()`` names.
            Patterns that match nothing are reported and skipped (an injector ``none`` has no layers); if none
            matches at all the run stops with an error, since a typo would otherwise silently log nothing.
        every_n_val_epochs: analyse after every N-th validation epoch (sanity checks do not count); 0 = never.
        timesteps: diffusion timesteps at which ``denoise_once`` runs.
        out_dir: where arrays and figures go; relative paths are resolved against ``trainer.default_root_dir``.
        face_crops: also analyse face crops of ``pl_module.last_samples`` and the reference face.
        face_size: side of the square face crops.
        face_channels: ``gray`` (luma) or ``rgb`` crops.
        on_test: run once more at test end and write ``<out_dir>/generated_faces.npz``.
        eps: added to ``|F|`` before the log.
        figures: draw the maps, curves and face-spectrum figures (PNG files and logged images); ``False`` keeps
            the spectra and scalars alone (drawing is most of an analysis's cost at small sizes).
    """

    def __init__(
        self,
        patterns: Sequence[str] = DEFAULT_PATTERNS,
        every_n_val_epochs: int = 1,
        timesteps: Sequence[int] = DEFAULT_TIMESTEPS,
        out_dir: str = "spectra",
        face_crops: bool = True,
        face_size: int = 32,
        face_channels: str = "gray",
        on_test: bool = True,
        eps: float = DEFAULT_EPS,
        figures: bool = True,
    ) -> None:
        super().__init__()
        if every_n_val_epochs < 0:
            raise ValueError(f"every_n_val_epochs must be >= 0, got {every_n_val_epochs}")
        if face_channels not in ("gray", "rgb"):
            raise ValueError(f"face_channels must be 'gray' or 'rgb', got {face_channels!r}")
        self.patterns = [re.compile(p) for p in patterns]
        self.every_n_val_epochs = every_n_val_epochs
        self.timesteps = [int(t) for t in timesteps]
        self.out_dir = out_dir
        self.face_crops = face_crops
        self.face_size = face_size
        self.face_channels = face_channels
        self.on_test = on_test
        self.eps = eps
        self.figures = figures
        self.val_epochs = 0
        # scalars of the latest analysis, ``freq/<tensor>/<scalar>``; after testing these include
        # ``freq/generated_faces/*`` for the run's metrics file
        self.latest_scalars: dict[str, float] = {}

    # -- Lightning hooks ---------------------------------------------------------------------------------
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.every_n_val_epochs == 0:
            return
        self.val_epochs += 1
        if self.val_epochs % self.every_n_val_epochs == 0:
            # the step too: with step-based validation (val_check_interval) one epoch holds several analyses
            self.run_analysis(trainer, pl_module, f"epoch_{trainer.current_epoch:03d}_step_{trainer.global_step:07d}")

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.on_test:
            return
        out = self.run_analysis(trainer, pl_module, "test")
        # the face scalars of the test samples are results of the run: put them where the task collects test
        # metrics (``trainer.callback_metrics``, read into metrics.json after ``trainer.test``)
        face_keys = (f"freq/{GENERATED_FACES}/", f"freq/{REFERENCE_FACE}/")
        trainer.callback_metrics.update(
            {k: torch.tensor(v) for k, v in self.latest_scalars.items() if k.startswith(face_keys)}
        )
        faces = out / GENERATED_FACES_FILE
        if not trainer.is_global_zero:
            return
        if faces.exists():
            shutil.copyfile(faces, out.parent / GENERATED_FACES_FILE)
        else:
            log.warning(
                "frequency analysis: no generated-face spectrum at test end, so %s is not written and "
                "`python -m consisid_lab.analyze` cannot use this run; the module must set last_samples",
                out.parent / GENERATED_FACES_FILE,
            )

    def state_dict(self) -> dict[str, Any]:
        return {"val_epochs": self.val_epochs}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.val_epochs = int(state_dict.get("val_epochs", 0))

    # -- analysis ------------------------------------------------------------------------------------------
    def resolve_out_dir(self, trainer: pl.Trainer) -> Path:
        out = Path(self.out_dir)
        return out if out.is_absolute() else Path(trainer.default_root_dir) / out

    def matched_modules(self, pl_module: nn.Module) -> list[tuple[int, str, nn.Module]]:
        """``(pattern index, name, module)`` in ``named_modules`` order, i.e. by depth within each pattern."""
        matches = [
            (i, name, module)
            for name, module in pl_module.named_modules()
            for i, pattern in enumerate(self.patterns)
            if pattern.fullmatch(name)
        ]
        for i, pattern in enumerate(self.patterns):
            if not any(m[0] == i for m in matches):
                log.info("frequency analysis: no module matches %r, skipped", pattern.pattern)
        if self.patterns and not matches:
            examples = [n for n, _ in pl_module.named_modules() if n][:8]
            raise ValueError(
                f"frequency analysis: none of the patterns {[p.pattern for p in self.patterns]} matches a module "
                f"name (e.g. {examples}); fix callbacks.frequency.patterns or set it to []"
            )
        return matches

    @torch.no_grad()
    def hooked_spectra(self, pl_module: pl.LightningModule) -> dict[int, dict[str, tuple[int, SpectrumResult]]]:
        """``{timestep: {module name: (pattern index, spectrum)}}`` from one ``denoise_once`` per timestep."""
        matches = self.matched_modules(pl_module)
        if not matches or not self.timesteps:
            return {}
        layout = tuple(pl_module.token_layout)
        batch = pl_module.analysis_batch()
        if hasattr(batch, "to"):
            batch = batch.to(pl_module.device)
        results: dict[int, dict[str, tuple[int, SpectrumResult]]] = {}
        for t in self.timesteps:
            accumulators = {name: SpectrumAccumulator(self.eps) for _, name, _ in matches}
            handles = [
                module.register_forward_hook(_SpectrumHook(name, accumulators[name], layout))
                for _, name, module in matches
            ]
            try:
                pl_module.denoise_once(batch, t)
            except NonFiniteInputError as err:
                # a diverged model: no spectrum at this timestep, and the run's record says why
                report_failure("spectra", f"activations at t={t} skipped: {err}")
                continue
            finally:
                for h in handles:
                    h.remove()
            results[t] = {
                name: (i, accumulators[name].result(name)) for i, name, _ in matches if accumulators[name].count
            }
            missing = [name for _, name, _ in matches if not accumulators[name].count]
            if missing:
                log.warning("frequency analysis: modules %s did not run during denoise_once(t=%d)", missing, t)
        return results

    @torch.no_grad()
    def face_spectra(self, pl_module: pl.LightningModule) -> dict[str, SpectrumResult]:
        """Spectra of the reference face and of face crops of the latest generated samples."""
        samples = getattr(pl_module, "last_samples", None) or {}
        out: dict[str, SpectrumResult] = {}
        if "video" in samples and "face_mask" in samples:
            video, mask = samples["video"], samples["face_mask"]  # (B, F, 3, H, W), (B, F, 1, H, W)
            crops = crop_faces(video.flatten(0, 1), mask.flatten(0, 1), self.face_size, self.face_channels)
            problem = nonfinite_summary(crops)
            if problem is not None:
                report_failure("spectra", f"{GENERATED_FACES} skipped: face crops of the samples: {problem}")
            elif len(crops):
                out[GENERATED_FACES] = compute_spectrum(crops, GENERATED_FACES, self.eps)
            else:
                log.warning("frequency analysis: every generated frame has an empty face mask; no face spectrum")
        else:
            log.warning("frequency analysis: pl_module.last_samples has no 'video' and 'face_mask'; no face spectrum")
        # the reference is cropped like the generated faces, so it needs its mask: the samples' own reference if
        # they carry its mask, else the fixed analysis batch's
        if samples.get("ref_face") is not None and samples.get("ref_mask") is not None:
            ref, ref_mask = samples["ref_face"], samples["ref_mask"]  # (B, 3, H, W), (B, 1, H, W)
        else:
            batch = pl_module.analysis_batch()
            ref, ref_mask = batch.ref_face, batch.ref_mask
        crops = crop_faces(ref, ref_mask, self.face_size, self.face_channels)
        if len(crops):
            out[REFERENCE_FACE] = compute_spectrum(crops, REFERENCE_FACE, self.eps)
        return out

    def run_analysis(self, trainer: pl.Trainer, pl_module: pl.LightningModule, tag: str) -> Path:
        """Compute, save and log every spectrum; returns the output folder of this analysis."""
        out = self.resolve_out_dir(trainer) / tag
        was_training = pl_module.training
        pl_module.eval()
        try:
            # every rank runs the forwards (sharded strategies need all ranks); only rank 0 writes
            hooked = self.hooked_spectra(pl_module)
            faces = self.face_spectra(pl_module) if self.face_crops else {}
        finally:
            pl_module.train(was_training)
        if not trainer.is_global_zero:
            return out
        short = _short_names([name for per_t in hooked.values() for name in per_t])
        scalars: dict[str, float] = {}
        images: dict[str, np.ndarray] = {}
        for t, per_t in hooked.items():
            for name, (_, result) in per_t.items():
                key = f"t{t:04d}/{short[name]}"
                result.name = key
                result.to_npz(out / f"{_file_stem(key)}.npz")
                scalars.update({f"freq/{key}/{k}": v for k, v in result.scalars.items()})
            if self.figures:
                images.update(self._plot_timestep(t, per_t, short, out))
        for name, result in faces.items():
            result.to_npz(out / f"{name}.npz")
            scalars.update({f"freq/{name}/{k}": v for k, v in result.scalars.items()})
        if faces and self.figures:
            images["freq/faces"] = self._plot_faces(faces, out / "faces.png")
        (out / "scalars.json").parent.mkdir(parents=True, exist_ok=True)
        (out / "scalars.json").write_text(json.dumps(scalars, indent=2, sort_keys=True))
        self.latest_scalars = scalars
        self._log(trainer, scalars, images)
        log.info("frequency analysis %s: %d spectra written to %s", tag, len(scalars) // 5, out)
        return out

    # -- figures and loggers -------------------------------------------------------------------------------
    def _plot_timestep(
        self, t: int, per_t: dict[str, tuple[int, SpectrumResult]], short: dict[str, str], out: Path
    ) -> dict[str, np.ndarray]:
        from consisid_lab.analysis.plots import plot_curves, plot_maps, render_figure

        if not per_t:
            return {}
        results = [r for _, r in per_t.values()]
        # map panels are small: their titles keep the last two name components (``transformer_blocks.3``)
        maps = plot_maps(results, [".".join(short[n].split(".")[-2:]) for n in per_t])
        maps.suptitle(f"centred relative log amplitude, t={t}")
        groups: dict[str, list[SpectrumResult]] = {}
        labels: dict[str, list[str]] = {}
        for name, (i, result) in per_t.items():
            groups.setdefault(str(i), []).append(result)
            labels.setdefault(str(i), []).append(short[name])
        # a panel per pattern, titled by what its modules share (``backbone.transformer.transformer_blocks``)
        titles = {k: _common_prefix(v) or self.patterns[int(k)].pattern for k, v in labels.items()}
        groups = {titles[k]: v for k, v in groups.items()}
        labels = {titles[k]: v for k, v in labels.items()}
        curves = plot_curves(groups, labels, depth=True)
        curves.suptitle(f"relative log amplitude by depth, t={t}")
        return {
            f"freq/maps/t{t:04d}": render_figure(maps, out / f"maps_t{t:04d}.png"),
            f"freq/curves/t{t:04d}": render_figure(curves, out / f"curves_t{t:04d}.png"),
        }

    @staticmethod
    def _plot_faces(faces: dict[str, SpectrumResult], path: Path) -> np.ndarray:
        from consisid_lab.analysis.plots import new_figure, render_figure

        fig = new_figure(3.2 * (len(faces) + 1), 3.0)
        axes = fig.subplots(1, len(faces) + 1, squeeze=False)[0]
        for ax, (name, r) in zip(axes, faces.items()):
            image = ax.imshow(r.rel_log_amp, cmap="inferno", extent=(-1, 1, 1, -1), interpolation="nearest")
            ax.set_title(name, fontsize=9)
            fig.colorbar(image, ax=ax, shrink=0.8)
        for name, r in faces.items():
            axes[-1].plot(r.radius, r.rel_curve, label=name)
        axes[-1].set_xlabel("normalised frequency (1 = Nyquist)")
        axes[-1].set_ylabel("relative log amplitude")
        axes[-1].legend(fontsize=7)
        return render_figure(fig, path)

    @staticmethod
    def _log(trainer: pl.Trainer, scalars: dict[str, float], images: dict[str, np.ndarray]) -> None:
        from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

        step = trainer.global_step
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=step)
            if isinstance(logger, WandbLogger):
                for key, image in images.items():
                    logger.log_image(key=key, images=[image], step=step)
            elif isinstance(logger, TensorBoardLogger):
                for key, image in images.items():
                    logger.experiment.add_image(key, image, global_step=step, dataformats="HWC")
            # other loggers (CSV, ...) take scalars only; the figures are in the run dir
