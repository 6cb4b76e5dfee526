"""The LightningModule: a thin training loop around the one denoiser.

:class:`~consisid_lab.models.denoiser.IdentityDenoiser` holds the model (conditioning components, backbone,
injector); :mod:`consisid_lab.models.objective` the loss (reference choice, dropouts, mask loss) as functions.
This module adds what a loop needs: which parameters train in which stage, the divergence guard, validation and
test sampling and metrics, the frequency-analysis contract, checkpoint contents and the optimizer.

State-dict keys are the denoiser's under ``denoiser.``; checkpoints written before the denoiser existed (keys
``backbone.*``, ``fuser.*`` ... at the top level) are migrated on load (:func:`migrate_checkpoint`).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig
from torch import Tensor

from consisid_lab.models import objective, train_knobs
from consisid_lab.models.denoiser import COMPONENTS, IdentityDenoiser
from consisid_lab.models.divergence import DivergenceGuard, all_finite, check_nan_settings, optimised_parameters
from consisid_lab.models.frozen_memo import FrozenFeatureMemo, memo_unavailable
from consisid_lab.models.knobs import SamplingKnobs
from consisid_lab.models.trainable import Stage, apply_lora, lr_multiplier, select_parameters, stage_index
from consisid_lab.types import VideoBatch
from consisid_lab.utils.faults import DivergenceError
from consisid_lab.utils.instantiate import instantiate, to_container

log = logging.getLogger(__name__)

DENOISER = "denoiser."


class NonFiniteLossError(DivergenceError):
    """Training went non-finite (loss or weights): raised after a checkpoint of the last good state is written,
    at the first failed step with ``nan_policy='stop'``, after ``max_nonfinite_steps`` in a row with ``'skip'``."""


def migrate_keys(names: dict[str, Any]) -> dict[str, Any]:
    """Keys of the layout before the denoiser (``backbone.x`` at the top level) -> ``denoiser.backbone.x``."""
    return {(DENOISER + k if k.split(".", 1)[0] in COMPONENTS else k): v for k, v in names.items()}


def migrate_checkpoint(checkpoint: dict[str, Any]) -> bool:
    """Migrate the state dict and the EMA shadow of an old-layout checkpoint in place; True if anything moved."""
    state = checkpoint.get("state_dict") or {}
    if not any(k.split(".", 1)[0] in COMPONENTS for k in state):
        return False
    checkpoint["state_dict"] = migrate_keys(state)
    for key, cb_state in (checkpoint.get("callbacks") or {}).items():
        if key.startswith("TrainableEMA") and isinstance(cb_state.get("shadow"), dict):
            cb_state["shadow"] = migrate_keys(cb_state["shadow"])
    return True


LR_SCHEDULES = ("constant", "cosine_with_restarts")


def lr_schedule(schedule: str, warmup_steps: int, total_steps: int, num_cycles: int = 1) -> Callable[[int], float]:
    """The learning-rate factor of optimiser step ``step`` (``LambdaLR``): a linear warm-up over ``warmup_steps``
    (``(step + 1) / warmup_steps``), then ``constant`` (1) or ``cosine_with_restarts`` (as released): ``num_cycles``
    cosine decays from 1 to 0 over the remaining ``total_steps - warmup_steps`` steps, each restarting at 1."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"model.optimizer.schedule={schedule!r} is not one of {list(LR_SCHEDULES)}")
    if num_cycles < 1:
        raise ValueError(f"model.optimizer.num_cycles={num_cycles} must be >= 1")
    if schedule != "constant" and total_steps <= warmup_steps:
        log.warning(
            "model.optimizer.warmup_steps=%d >= trainer.max_steps=%d: the run ends inside the warm-up and never "
            "reaches the %s decay",
            warmup_steps,
            total_steps,
            schedule,
        )
    span = max(1, total_steps - warmup_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / span
        if progress >= 1.0:
            return 0.0
        return 0.5 * (1.0 + math.cos(math.pi * ((num_cycles * progress) % 1.0)))

    return factor


def diff_lr_multipliers(cfg: Mapping[str, Any]) -> dict[str, float]:
    """The released "diff-lr" (``model.optimizer.diff_lr: true``): the identity cross-attention (``backbone.injector``)
    at ``diff_lr_identity`` (x10 as released) times the learning rate, every other module at ``diff_lr_rest`` (x0.1).
    Explicit ``lr_multipliers`` override these."""
    if not cfg.get("diff_lr", False):
        return {}
    identity, rest = float(cfg.get("diff_lr_identity", 10.0)), float(cfg.get("diff_lr_rest", 0.1))
    return {**dict.fromkeys(COMPONENTS, rest), "backbone.injector": identity}


class IdentityVideoModule(pl.LightningModule):
    def __init__(
        self,
        vae: DictConfig | dict,
        text_encoder: DictConfig | dict,
        keypoint_renderer: DictConfig | dict | None,
        global_encoder: DictConfig | dict | None,
        local_encoder: DictConfig | dict | None,
        fuser: DictConfig | dict | None,
        injector: DictConfig | dict | None,
        backbone: DictConfig | dict,
        scheduler: DictConfig | dict,
        optimizer: DictConfig | dict,
        loss: DictConfig | dict,
        sampling: DictConfig | dict,
        trainable: list[str] | None = None,
        nan_policy: str = "skip",
        max_nonfinite_steps: int = 3,
        gradient_checkpointing: bool = False,
        metrics: DictConfig | dict | None = None,
        stages: list[dict] | None = None,
        lora: DictConfig | dict | None = None,
        init_from: str | None = None,
        frozen_dtype: str | None = None,
        compile_blocks: bool = False,
        fp8_training: bool = False,
        frozen_memo: bool = False,
    ) -> None:
        super().__init__()
        # Plain containers only: checkpoints load with weights_only=True and carry their config.
        self.save_hyperparameters(
            {k: to_container(v) for k, v in locals().items() if k not in ("self", "__class__")}, logger=False
        )
        check_nan_settings(nan_policy, max_nonfinite_steps)
        self.nan_policy = nan_policy
        self.divergence = DivergenceGuard(nan_policy, max_nonfinite_steps)
        self._streak_batch: VideoBatch | None = None
        self.loss_cfg = dict(to_container(loss))
        self.loss_settings = objective.LossSettings.parse(self.loss_cfg)
        self._warned_cached_posterior = False
        self.sampling_cfg = dict(to_container(sampling))
        SamplingKnobs.from_config(self.sampling_cfg.get("knobs"))  # unknown or out-of-range knobs: refused now
        self.optimizer_cfg = dict(to_container(optimizer))

        from consisid_lab.models.diffusion import make_scheduler

        groups = {
            "vae": vae,
            "text_encoder": text_encoder,
            "keypoint_renderer": keypoint_renderer,
            "global_encoder": global_encoder,
            "local_encoder": local_encoder,
            "fuser": fuser,
            "injector": injector,
            "backbone": backbone,
        }
        self.denoiser = IdentityDenoiser.from_config(
            **{k: to_container(v) for k, v in groups.items()},
            gradient_checkpointing=gradient_checkpointing,
            init_from=init_from,
        )
        self.noise_scheduler = make_scheduler(**dict(to_container(scheduler)))
        if lora:
            lora_cfg = dict(to_container(lora))
            apply_lora(self.denoiser.backbone.transformer, **lora_cfg)
            log.info("LoRA adapters on the backbone: %s", lora_cfg)
        self.stages = [Stage.parse(dict(to_container(st))) for st in (stages or [])]
        self._current_stage: int | None = None
        self.trainable_selectors = list(trainable) if trainable is not None else ["text_encoder", "fuser", "backbone"]
        # The optimizer holds every parameter that trains in any stage; a stage toggles requires_grad.
        selections = [st.trainable for st in self.stages] or [self.trainable_selectors]
        self._optimized = set().union(*(self._select(sel) for sel in selections))
        self._set_trainable(self._select(selections[0]))
        self.compile_blocks, self.fp8_training = bool(compile_blocks), bool(fp8_training)
        self._compiled = self._fp8_done = False  # applied once, at the first fit setup
        self.frozen_dtype = train_knobs.frozen_dtype(frozen_dtype)
        if self.frozen_dtype is not None:
            cast = train_knobs.cast_frozen(self.denoiser, self._optimized, self.frozen_dtype)
            log.info("%d frozen backbone parameters stored in %s", len(cast), self.frozen_dtype)
        self.metrics_cfg = to_container(metrics) if metrics is not None else None
        self.benchmark_metrics = None  # built lazily in setup(): needs the evaluator stand-ins
        self.stability = {"max_grad_norm": 0.0, "nan_events": 0}
        self.last_samples: dict[str, Tensor] = {}
        self._analysis_batch: VideoBatch | None = None
        self.run_config: dict[str, Any] | None = None  # the whole run's config, stored in every checkpoint
        self.frozen_memo_enabled = bool(frozen_memo)
        self.frozen_memo: FrozenFeatureMemo | None = None  # built at the start of training (a plain attribute)

    # ------------------------------------------------------------------ which parameters train
    def _select(self, selectors: list[str]) -> set[str]:
        """Denoiser parameter names (``fuser.x``, ``backbone.injector.y``) picked by ``selectors``."""
        picked = select_parameters(self.denoiser, selectors, COMPONENTS)
        # Components that declare themselves frozen never train, whatever the selectors say.
        frozen = tuple(f"{name}." for name in self.denoiser.frozen_components())
        return {n for n in picked if not n.startswith(frozen)}

    def _set_trainable(self, names: set[str]) -> None:
        for n, p in self.denoiser.named_parameters():
            p.requires_grad_(n in names)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if not self.stages:
            return
        idx = stage_index(self.stages, self.global_step, self.trainer.max_steps)
        if idx == self._current_stage:
            return
        stage = self.stages[idx]
        self._set_trainable(self._select(stage.trainable))
        multipliers = {**dict(self.optimizer_cfg.get("lr_multipliers") or {}), **stage.lr_multipliers}
        base_lr = float(self.optimizer_cfg.get("lr", 1e-4))
        warmup = int(self.optimizer_cfg.get("warmup_steps", 0))
        factor = min(1.0, (self.global_step + 1) / warmup) if warmup > 0 else 1.0
        for opt in self.trainer.optimizers:
            new = [base_lr * lr_multiplier(g["name"], multipliers) for g in opt.param_groups]
            for group, lr in zip(opt.param_groups, new):
                group["initial_lr"] = lr
                group["lr"] = lr * factor
            for sched_cfg in self.trainer.lr_scheduler_configs:
                if sched_cfg.scheduler.optimizer is opt:
                    sched_cfg.scheduler.base_lrs = list(new)
        n_train = sum(p.numel() for p in self.parameters() if p.requires_grad)
        log.info(
            "training stage %d/%d %r from step %d: %s (%.2fM trainable parameters)",
            idx + 1, len(self.stages), stage.name, self.global_step, stage.trainable, n_train / 1e6,
        )  # fmt: skip
        self._current_stage = idx
        self.log("train/stage", float(idx))

    # ------------------------------------------------------------------ training
    def _latents(self, batch: VideoBatch) -> Tensor:
        if "latents" in batch.cached:
            return batch.cached["latents"]
        with torch.no_grad():
            return self.denoiser.vae.encode(batch.video)  # (B, f, C, h, w)

    def compute_loss(self, batch: VideoBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """The objective of one step; all its randomness comes from (seed, global step): exact resume."""
        settings = self.loss_settings
        gen = objective.step_generator(settings.seed, self.global_step)
        with objective.posterior_sampling(self.denoiser.vae, settings, settings.seed, self.global_step) as sampled:
            if sampled and "latents" in batch.cached and not self._warned_cached_posterior:
                self._warned_cached_posterior = True
                log.warning(
                    "model.loss.sample_posterior=true, but the video latents come from the preprocessing cache (the "
                    "posterior means): only the reference image's latent is sampled; train without the latent cache "
                    "to sample the video latents too"
                )
            memo = self.frozen_memo
            if memo is not None and (batch.cached or not memo.covers(batch)):
                memo = None  # preprocessed features, another clip length or a corrupt video: encoded as it is
            x0 = memo.video_latents(batch) if memo is not None else self._latents(batch)
            return objective.training_loss(self.denoiser, self.noise_scheduler, batch, x0, settings, gen, memo=memo)

    def on_train_start(self) -> None:
        """Build the frozen-encoder memo of the training clips (``model.frozen_memo``) where it applies."""
        if not self.frozen_memo_enabled or self.frozen_memo is not None:
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        dataset = datamodule.dataset("train") if hasattr(datamodule, "dataset") else None
        if dataset is None:
            why: str | None = "no datamodule with a training split"
        else:
            why = memo_unavailable(dataset, self.loss_settings)
        if why is not None:
            log.info("model.frozen_memo: the frozen encoders run every step (%s)", why)
            return
        # Fixed batches of 32 whatever the training batch size: the memo is the same for every run of the config.
        self.frozen_memo = FrozenFeatureMemo.build(self.denoiser, dataset, batch_size=32)

    def _stage_clip(self, batch: VideoBatch) -> VideoBatch:
        """Shorten clips to the current stage's ``num_frames`` (hierarchical training on short clips first)."""
        if not self.stages or self._current_stage is None:
            return batch
        n = self.stages[self._current_stage].num_frames
        if n is None or n >= batch.video.shape[1]:
            return batch
        codec = self.denoiser.vae
        codec.check_size(n, batch.video.shape[3], batch.video.shape[4])
        cached = dict(batch.cached)
        if "latents" in cached:
            cached["latents"] = cached["latents"][:, : codec.num_latent_frames(n)]
        return replace(
            batch,
            video=batch.video[:, :n],
            kps=batch.kps[:, :n],
            face_mask=batch.face_mask[:, :n],
            boxes=batch.boxes[:, :n],
            cached=cached,
        )

    def training_step(self, batch: VideoBatch, batch_idx: int) -> Tensor | None:
        batch = self._stage_clip(batch)
        loss, parts = self.compute_loss(batch)
        if not torch.isfinite(loss):
            return self._on_nonfinite(loss, parts, batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch.batch_size)
        self.log("train/mask_loss_on", parts["mask_loss_on"], batch_size=batch.batch_size)
        return loss

    def _on_nonfinite(self, loss: Tensor, parts: dict[str, Tensor], batch: VideoBatch) -> None:
        self.stability["nan_events"] += 1
        log.error(
            "non-finite loss %s at global step %d (identities %s, clips %s, parts %s); policy=%s",
            loss.item(),
            self.global_step,
            batch.identity.tolist(),
            batch.clip_id.tolist(),
            {k: float(v) for k, v in parts.items()},
            self.nan_policy,
        )
        self.log("train/nan_events", float(self.stability["nan_events"]), batch_size=batch.batch_size)
        self.divergence.fail(self.global_step, f"non-finite loss {loss.item()}")
        return None  # Lightning skips backward (no update); optimizer_step then applies the policy

    def on_before_backward(self, loss: Tensor) -> None:
        # Only finite losses get here (non-finite ones return None): they confirm the weights that made them.
        self.divergence.confirm(self.global_step, self.optimizers())

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        # Before the callbacks' on_train_batch_end: checkpoints and the EMA never see a failed step's weights.
        if not all_finite(optimised_parameters(optimizer)):
            self.stability["nan_events"] += 1
            log.error("non-finite weights after the optimiser step at global step %d", self.global_step)
            self.divergence.fail(self.global_step, "non-finite weights after the optimiser step")
        failed = self.divergence.step_failed
        must_stop = self.divergence.end_step(optimizer)
        if failed:
            log.error(
                "step %d undone: restored the weights and optimiser state of the last good step (policy=%s, %d "
                "failed steps since the last confirmed update, max_nonfinite_steps=%d)",
                self.global_step,
                self.nan_policy,
                self.divergence.consecutive,
                self.divergence.max_nonfinite_steps,
            )
        if must_stop:
            why = (
                "nan_policy=stop"
                if self.nan_policy == "stop"
                else f"{self.divergence.consecutive} failed steps without a confirmed update in between "
                f"(max_nonfinite_steps={self.divergence.max_nonfinite_steps})"
            )
            self._stop_diverged(why)

    def on_train_batch_end(self, outputs: Any, batch: VideoBatch, batch_idx: int) -> None:
        # Kept only while a streak of failed steps is unconfirmed: on_train_end may need it to check the weights.
        self._streak_batch = batch if self.divergence.unconfirmed_streak else None

    def on_train_end(self) -> None:
        """Training that ends inside a streak of failed steps confirms its final weights with one more loss."""
        batch = self._streak_batch
        if batch is None or not self.divergence.unconfirmed_streak:
            return
        with torch.no_grad():
            loss, _ = self.compute_loss(self._stage_clip(batch))
        if torch.isfinite(loss):
            self.divergence.confirm(self.global_step, self.optimizers())
            return
        self.divergence.fail(self.global_step, f"non-finite loss {loss.item()} at the final weights")
        self.divergence.end_step(self.optimizers())
        self._stop_diverged("training ended inside the streak, and its final weights give a non-finite loss")

    def _stop_diverged(self, why: str) -> None:
        """Save the (restored) last good state, then stop with the first bad step and that file."""
        guard = self.divergence
        step = guard.first_bad_step if guard.first_bad_step is not None else self.global_step
        path = self._last_good_path()
        if path is not None:
            self.trainer.save_checkpoint(path)
            log.error("saved the last good state to %s", path)
        raise NonFiniteLossError(
            f"training diverged at step {step} ({why}: {'; '.join(guard.reasons[-3:])}); last good state saved to "
            f"{path}. Resume with ckpt_path=<that file> after lowering the learning rate (or with gradient "
            "clipping), or raise model.max_nonfinite_steps",
            step=step,
            last_good_checkpoint=path,
        )

    def _last_good_path(self) -> str | None:
        if self.trainer is None or self.trainer.default_root_dir is None:
            return None
        return os.path.join(self.trainer.default_root_dir, "checkpoints", "last_good.ckpt")

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        norms = [p.grad.detach().norm() for p in self.parameters() if p.grad is not None]
        if norms:
            total = torch.linalg.vector_norm(torch.stack(norms)).item()
            self.stability["max_grad_norm"] = max(self.stability["max_grad_norm"], total)
            self.log("train/grad_norm", total)

    # ------------------------------------------------------------------ sampling and evaluation
    @torch.no_grad()
    def generate(
        self,
        batch: VideoBatch,
        face: Tensor | None = None,
        kps: Tensor | None = None,
        seed: int = 0,
        num_steps: int | None = None,
        guidance_scale: float | None = None,
    ) -> Tensor:
        """Sample videos ``(B, F, 3, H, W)`` in [-1, 1] for the batch's captions and a reference face."""
        from consisid_lab.models.sampling import sample_video

        b, num_frames, _, height, width = batch.video.shape
        return sample_video(
            self.denoiser,
            self.noise_scheduler,
            face=batch.ref_face if face is None else face,
            kps=batch.ref_kps if kps is None else kps,
            captions=list(batch.caption),
            negative=[""] * b,
            num_frames=num_frames,
            height=height,
            width=width,
            num_steps=int(self.sampling_cfg.get("num_steps", 10) if num_steps is None else num_steps),
            guidance_scale=float(
                self.sampling_cfg.get("guidance_scale", 1.0) if guidance_scale is None else guidance_scale
            ),
            use_dynamic_cfg=bool(self.sampling_cfg.get("use_dynamic_cfg", False)),
            generator=torch.Generator(device="cpu").manual_seed(seed),
            device=self.device,
            knobs=self.sampling_cfg.get("knobs"),
            guidance_drops=tuple(self.sampling_cfg.get("guidance_drops", ("text",))),
        )

    def setup(self, stage: str) -> None:
        if stage == "fit" and self._trainer is not None:
            train_knobs.check_frozen_precision(self.frozen_dtype, self.trainer.precision)
        if stage == "fit":
            if self.fp8_training and not self._fp8_done:
                n = train_knobs.fp8_training(self.denoiser.backbone.blocks, self.device)
                log.info("FP8 training: %d DiT linears converted (torchao)", n)
                self._fp8_done = True
            if self.compile_blocks and not self._compiled:
                n = train_knobs.compile_blocks(self.denoiser.backbone.blocks, self.device)
                log.info("regional compile: %d DiT blocks compiled in place", n)
                self._compiled = True
        # Measuring instruments, not model parts: kept out of the state dict (a plain attribute).
        if self.benchmark_metrics is None and self.metrics_cfg is not None:
            from consisid_lab.metrics.finite import FiniteSamplesOnly

            self.benchmark_metrics = FiniteSamplesOnly(instantiate(self.metrics_cfg))

    def _eval_step(self, batch: VideoBatch, batch_idx: int, prefix: str) -> None:
        # A deterministic denoising loss at fixed timesteps: comparable across runs and epochs.
        loss = objective.fixed_timestep_loss(
            self.denoiser, self.noise_scheduler, batch, self._latents(batch), seed=1234 + batch_idx
        )
        self.log(f"{prefix}/loss", loss, batch_size=batch.batch_size, sync_dist=True)

        max_batches = int(self.sampling_cfg.get(f"{prefix}_batches", 1))
        if self.benchmark_metrics is None or batch_idx >= max_batches:
            return
        video = self.generate(batch, seed=batch_idx)
        self.benchmark_metrics.update(batch, video)
        if batch_idx == 0:
            self.last_samples = {
                "video": video.detach().cpu(),
                "face_mask": batch.face_mask.detach().cpu(),
                "ref_face": batch.ref_face.detach().cpu(),
                "ref_mask": batch.ref_mask.detach().cpu(),
                "real": batch.video.detach().cpu(),
            }

    def validation_step(self, batch: VideoBatch, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "val")

    def test_step(self, batch: VideoBatch, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "test")

    def _eval_epoch_end(self, prefix: str) -> None:
        if self.benchmark_metrics is None or not self.benchmark_metrics.has_updates():
            return
        for k, v in self.benchmark_metrics.compute().items():
            self.log(f"{prefix}/{k}", v, sync_dist=True)
        self.benchmark_metrics.reset()
        if self.last_samples and self.trainer is not None:
            from consisid_lab.utils.media import log_videos, save_samples

            log_videos(self.trainer.loggers, f"{prefix}/samples", self.last_samples, step=self.global_step)
            if self.trainer.is_global_zero and self.trainer.default_root_dir is not None:
                path = save_samples(self.last_samples, self.trainer.default_root_dir, prefix, self.global_step)
                log.info("%s samples (generated and real, uint8) written to %s", prefix, path)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    # ------------------------------------------------------------------ frequency-analysis contract
    def analysis_batch(self) -> VideoBatch:
        if self._analysis_batch is None:
            dm = self.trainer.datamodule
            self._analysis_batch = dm.fixed_batch("val").to(self.device)
        return self._analysis_batch

    @property
    def token_layout(self) -> tuple[int, int, int, int]:
        b = self.analysis_batch()
        d = self.denoiser
        f, _, h, w = d.vae.latent_shape(b.video.shape[1], b.video.shape[3], b.video.shape[4])
        p = d.backbone.patch_size
        return (d.text_encoder.max_length, f, h // p, w // p)

    @torch.no_grad()
    def denoise_once(self, batch: VideoBatch, timestep: int) -> Tensor:
        x0 = self._latents(batch)
        gen = torch.Generator(device="cpu").manual_seed(0)
        noise = torch.randn(x0.shape, generator=gen).to(x0)
        t = torch.full((x0.shape[0],), int(timestep), device=self.device, dtype=torch.long)
        x_t = self.noise_scheduler.add_noise(x0, noise, t)
        cond = self.denoiser.conditions(batch.ref_face, batch.ref_kps, list(batch.caption), x0.shape[1])
        return self.denoiser(x_t, t, cond)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        from consisid_lab.utils.checkpoints import machine_cache_dir, portable_config

        # No absolute cache path of this machine in the stored config: written relative to a marker that the
        # loading machine resolves to its own cache (consisid_lab.utils.checkpoints.localised_config).
        roots = dict.fromkeys([((self.run_config or {}).get("paths") or {}).get("cache_dir"), machine_cache_dir()])
        hparams, run_config = dict(checkpoint.get("hyper_parameters") or {}), self.run_config
        for root in roots:
            hparams, run_config = portable_config(hparams, root), portable_config(run_config, root)
        if "hyper_parameters" in checkpoint:
            checkpoint["hyper_parameters"] = hparams
        checkpoint["run_config"] = run_config
        checkpoint["stability"] = dict(self.stability)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Runs before the state dict and the callbacks' states are restored (fit resume and load_from_checkpoint).
        if migrate_checkpoint(checkpoint):
            log.info("migrated a checkpoint of the layout before the denoiser (keys now under %r)", DENOISER)
        from consisid_lab.utils.checkpoints import localised_config

        self.run_config = localised_config(checkpoint.get("run_config"))
        self.stability.update(checkpoint.get("stability") or {})

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> Any:
        """AdamW with one parameter group per module prefix (named, so stages can retune their learning rates)."""
        cfg = self.optimizer_cfg
        base_lr = float(cfg.get("lr", 1e-4))
        multipliers: dict[str, float] = {**diff_lr_multipliers(cfg), **dict(cfg.get("lr_multipliers") or {})}
        prefixes = set(multipliers) | {m for st in self.stages for m in st.lr_multipliers}
        groups: dict[str, list[torch.nn.Parameter]] = {}
        for name, p in self.denoiser.named_parameters():
            if name not in self._optimized:
                continue
            matching = [pre for pre in prefixes if name == pre or name.startswith(pre + ".")]
            key = max(matching, key=len) if matching else name.split(".")[0]
            groups.setdefault(key, []).append(p)
        if not groups:
            raise ValueError(f"no trainable parameters: `model.trainable={self.trainable_selectors}` selects none")
        param_groups = [
            {"params": ps, "name": key, "lr": base_lr * lr_multiplier(key, multipliers)}
            for key, ps in sorted(groups.items())
        ]
        opt = torch.optim.AdamW(
            param_groups,
            **train_knobs.adamw_fused_options(cfg.get("fused"), (p for g in param_groups for p in g["params"])),
            lr=base_lr,
            betas=tuple(cfg.get("betas", (0.9, 0.999))),
            weight_decay=float(cfg.get("weight_decay", 0.0)),
            eps=float(cfg.get("eps", 1e-8)),
        )
        warmup = int(cfg.get("warmup_steps", 0))
        schedule = str(cfg.get("schedule", "constant"))
        if warmup <= 0 and schedule == "constant":
            return opt
        total = self._total_steps() if schedule != "constant" else 0
        factor = lr_schedule(schedule, warmup, total, int(cfg.get("num_cycles", 1)))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _total_steps(self) -> int:
        trainer = self._trainer
        steps = int(trainer.max_steps) if trainer is not None else -1
        if steps <= 0:
            raise ValueError(
                f"model.optimizer.schedule={self.optimizer_cfg.get('schedule')!r} decays over trainer.max_steps, but "
                f"trainer.max_steps={steps}; set trainer.max_steps, or model.optimizer.schedule=constant"
            )
        return steps
