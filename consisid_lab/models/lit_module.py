"""The LightningModule that composes the identity components around a video DiT.

Data flow of one training step (shapes symbolic):

    video (B, F, 3, H, W) --vae--> x0 (B, f, C, h, w)
    reference face --keypoint renderer--> kps image --+
    reference face ----------------------------------+--global encoder--> g (B, f, C_g, h, w)   (low frequency)
    reference face --local encoder--> IdentityFeatures --fuser--> id tokens (B, Q, D_kv)       (high frequency)
    x_t = noise(x0, t);  v = DiT(cat(x_t, g), text, t, id tokens via the injector)
    loss = |x0_hat(v) - x0|^2 / (1 - alpha_bar_t)   (optionally on the face mask only)
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor

from consisid_lab.models.diffusion import sample_timesteps
from consisid_lab.models.divergence import DivergenceGuard, all_finite, check_nan_settings, optimised_parameters
from consisid_lab.models.injector import NoInjector
from consisid_lab.models.trainable import Stage, apply_lora, lr_multiplier, select_parameters, stage_index
from consisid_lab.types import IdentityFeatures, VideoBatch
from consisid_lab.utils.faults import DivergenceError
from consisid_lab.utils.instantiate import instantiate, to_container

log = logging.getLogger(__name__)

# Top-level modules; the injector lives inside the backbone (``backbone.injector``).
COMPONENTS = ("vae", "text_encoder", "keypoint_renderer", "global_encoder", "local_encoder", "fuser", "backbone")
FROZEN_PREFIXES = ("vae.", "local_encoder.")


class NonFiniteLossError(DivergenceError):
    """Training went non-finite (loss or weights): raised after a checkpoint of the last good state is written,
    at the first failed step with ``nan_policy='stop'``, after ``max_nonfinite_steps`` in a row with ``'skip'``."""


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
        self.sampling_cfg = dict(to_container(sampling))
        self.optimizer_cfg = dict(to_container(optimizer))

        from consisid_lab.models.diffusion import make_scheduler

        self.vae = instantiate(vae)
        self.text_encoder = instantiate(text_encoder)
        self.keypoint_renderer = instantiate(keypoint_renderer)
        self.global_encoder = instantiate(global_encoder)
        self.local_encoder = instantiate(local_encoder)
        self._check_composition()

        self.fuser = None
        has_local = bool(self.local_encoder.vector_dims or self.local_encoder.token_dims)
        if has_local:
            self.fuser = _build_fuser(fuser, self.local_encoder)
        g_channels = self.global_encoder.channels(self.vae)
        self.backbone = instantiate(
            backbone,
            in_channels=self.vae.latent_channels + g_channels,
            out_channels=self.vae.latent_channels,
            text_dim=self.text_encoder.dim,
        )
        kv_dim = self.fuser.output_dim if self.fuser is not None else 1
        # The injector is owned by the backbone (``backbone.injector``), which calls it at its declared places.
        self.backbone.set_injector(
            instantiate(injector, dim=self.backbone.inner_dim, kv_dim=kv_dim, num_layers=self.backbone.num_layers)
        )
        if has_local and isinstance(self.backbone.injector, NoInjector):
            log.warning("the local encoder's identity tokens are computed but model/injector=none never uses them")
        self._rotary_cache: dict[tuple, Any] = {}
        if gradient_checkpointing:
            self.backbone.enable_gradient_checkpointing()
        self.noise_scheduler = make_scheduler(**dict(to_container(scheduler)))
        if lora:
            lora_cfg = dict(to_container(lora))
            apply_lora(self.backbone.transformer, **lora_cfg)
            log.info("LoRA adapters on the backbone: %s", lora_cfg)
        self.stages = [Stage.parse(dict(to_container(st))) for st in (stages or [])]
        self._current_stage: int | None = None
        self.trainable_selectors = list(trainable) if trainable is not None else ["text_encoder", "fuser", "backbone"]
        # The optimizer holds every parameter that trains in any stage; a stage toggles requires_grad.
        selections = [st.trainable for st in self.stages] or [self.trainable_selectors]
        self._optimized = set().union(*(self._select(sel) for sel in selections))
        self._set_trainable(self._select(selections[0]))
        self.metrics_cfg = to_container(metrics) if metrics is not None else None
        self.benchmark_metrics = None  # built lazily in setup(): needs the evaluator stand-ins
        self.stability = {"max_grad_norm": 0.0, "nan_events": 0}
        self.last_samples: dict[str, Tensor] = {}
        self._analysis_batch: VideoBatch | None = None
        self.run_config: dict[str, Any] | None = None  # the whole run's config, stored in every checkpoint

    # ------------------------------------------------------------------ composition
    def _check_composition(self) -> None:
        if getattr(self.global_encoder, "use_kps", False) and not self.keypoint_renderer.renders:
            raise ValueError(
                "model/global_encoder has use_kps=true but model/keypoint_renderer=none renders no keypoint "
                "image; pick model/keypoint_renderer=five_point or set model.global_encoder.use_kps=false"
            )
        no_global = self.global_encoder.channels(self.vae) == 0
        no_local = not (self.local_encoder.vector_dims or self.local_encoder.token_dims)
        if no_global and no_local:
            raise ValueError(
                "model/global_encoder=none and model/local_encoder=none leave no identity route; keep at least one"
            )

    def _select(self, selectors: list[str]) -> set[str]:
        picked = select_parameters(self, selectors, COMPONENTS)
        # Frozen extractors never train, whatever the selectors say.
        return {n for n in picked if not n.startswith(FROZEN_PREFIXES)}

    def _set_trainable(self, names: set[str]) -> None:
        for n, p in self.named_parameters():
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

    # ------------------------------------------------------------------ conditioning
    def encode_text(self, captions: list[str]) -> Tensor:
        return self.text_encoder(captions)  # (B, L, D_text)

    def _batch_text(self, batch: VideoBatch, drop: list[bool]) -> Tensor:
        """Caption tokens, with dropped captions (classifier-free guidance) replaced by the empty caption.

        Cached tokens (from preprocessing) are used only with a frozen text encoder: a trainable one (the
        bag-of-words default) would make them stale after the first step.
        """
        frozen = not any(p.requires_grad for p in self.text_encoder.parameters())
        if "text" in batch.cached and frozen:
            text = batch.cached["text"]
            if any(drop):
                empty = self.encode_text([""]).to(text)  # (1, L, D)
                keep = torch.tensor([not d for d in drop], device=text.device).view(-1, 1, 1)
                text = torch.where(keep, text, empty)
            return text
        return self.encode_text(["" if d else c for d, c in zip(drop, batch.caption)])

    @staticmethod
    def _cached_features(batch: VideoBatch, use_cross: Tensor) -> IdentityFeatures | None:
        """Local-encoder features from the preprocessing cache, intra or cross-face reference per sample.

        The cached cross-face features were computed without the training-time noise on the reference.
        """
        c = batch.cached
        vec = sorted(k.split("/", 1)[1] for k in c if k.startswith("id_vec/"))
        tok = sorted(k.split("/", 1)[1] for k in c if k.startswith("id_tok/"))
        if not vec and not tok:
            return None

        def pick(kind: str, name: str) -> Tensor:
            intra, cross = c[f"id_{kind}/{name}"], c.get(f"ref_id_{kind}/{name}", c[f"id_{kind}/{name}"])
            return torch.where(use_cross.view(-1, *([1] * (intra.ndim - 1))), cross, intra)

        return IdentityFeatures(vectors={n: pick("vec", n) for n in vec}, tokens={n: pick("tok", n) for n in tok})

    def identity_conditions(
        self, face: Tensor, kps: Tensor, num_latent_frames: int, feats: IdentityFeatures | None = None
    ) -> tuple[Tensor | None, Tensor | None, IdentityFeatures | None]:
        """Global conditioning latent and identity tokens for reference faces ``(B, 3, H, W)``.

        ``feats``: the local encoder's features when already known (read from the preprocessing cache).
        """
        kps_image = self.keypoint_renderer(face, kps) if getattr(self.global_encoder, "use_kps", False) else None
        g = self.global_encoder(face, kps_image, self.vae, num_latent_frames)  # (B, f, C_g, h, w) or None
        feats = self.local_encoder(face) if feats is None else feats
        tokens = self.fuser(feats) if self.fuser is not None else None  # (B, Q, D_kv)
        return g, tokens, feats

    def denoise(self, x_t: Tensor, t: Tensor, text: Tensor, g: Tensor | None, tokens: Tensor | None) -> Tensor:
        """The model ``f(x_t, t, cond) -> v``; all conditioning already encoded."""
        inp = x_t if g is None else torch.cat([x_t, g.to(x_t.dtype)], dim=2)  # (B, f, C + C_g, h, w)
        return self.backbone(inp, text, t, image_rotary_emb=self._rotary(x_t), identity_tokens=tokens)

    def _rotary(self, x: Tensor) -> Any:
        f, _, h, w = x.shape[1:]
        key = (f, h, w, x.device)
        if key not in self._rotary_cache:
            self._rotary_cache[key] = self.backbone.rotary_embedding(f, h, w, device=x.device)
        return self._rotary_cache[key]

    # ------------------------------------------------------------------ training
    def _latents(self, batch: VideoBatch) -> Tensor:
        if "latents" in batch.cached:
            return batch.cached["latents"]
        with torch.no_grad():
            return self.vae.encode(batch.video)  # (B, f, C, h, w)

    def _step_generator(self) -> torch.Generator:
        """All training randomness of a step comes from (seed, global step): a resumed run repeats it exactly."""
        seed = int(self.loss_cfg.get("seed", 0))
        return torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + int(self.global_step))

    def _choose_reference(self, batch: VideoBatch, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """Dynamic cross-face reference: with probability beta the face comes from outside the clip, plus noise.

        Returns the reference faces ``(B, 3, H, W)``, their keypoints ``(B, 5, 2)`` and the choice ``(B,)``.
        """
        beta = float(self.loss_cfg.get("cross_face_prob", 0.5))
        noise_std = float(self.loss_cfg.get("cross_face_noise", 0.05))
        b = batch.batch_size
        use_cross = (torch.rand(b, generator=gen) < beta).to(self.device)  # (B,)
        sel = use_cross.view(b, 1, 1, 1)
        face = torch.where(sel, batch.ref_face, batch.intra_face)
        if noise_std > 0:
            noise = (torch.randn(face.shape, generator=gen) * noise_std).to(face)
            face = torch.where(sel, (face + noise).clamp(-1, 1), face)
        kps = torch.where(use_cross.view(b, 1, 1), batch.ref_kps, batch.intra_kps)
        return face, kps, use_cross

    def compute_loss(self, batch: VideoBatch) -> tuple[Tensor, dict[str, Tensor]]:
        gen = self._step_generator()
        x0 = self._latents(batch)  # (B, f, C, h, w)
        b, f = x0.shape[:2]
        p_text = float(self.loss_cfg.get("text_dropout", 0.1))
        drop = [r < p_text for r in torch.rand(b, generator=gen).tolist()]
        text = self._batch_text(batch, drop)
        face, kps, use_cross = self._choose_reference(batch, gen)
        g, tokens, _ = self.identity_conditions(face, kps, f, feats=self._cached_features(batch, use_cross))
        p_id = float(self.loss_cfg.get("identity_dropout", 0.0))
        keep = (torch.rand(b, generator=gen) >= p_id).to(x0)  # (B,)
        if p_id > 0:
            if g is not None:
                g = g * keep.view(b, 1, 1, 1, 1)
            if tokens is not None:
                tokens = tokens * keep.view(b, 1, 1)

        t = sample_timesteps(
            self.noise_scheduler, b, gen, self.device, float(self.loss_cfg.get("high_noise_bias", 1.0))
        )
        noise = torch.randn(x0.shape, generator=gen).to(x0)
        alpha = float(self.loss_cfg.get("mask_prob", 0.5))
        use_mask = torch.rand((), generator=gen).item() < alpha
        mask = self._latent_mask(batch.face_mask, x0.shape) if use_mask else None
        loss = self._denoising_loss(x0, noise, t, text, g, tokens, mask).mean()
        parts = {"loss": loss.detach(), "mask_loss_on": torch.tensor(float(use_mask))}
        return loss, parts

    def _denoising_loss(
        self,
        x0: Tensor,
        noise: Tensor,
        t: Tensor,
        text: Tensor,
        g: Tensor | None,
        tokens: Tensor | None,
        mask: Tensor | None = None,
    ) -> Tensor:
        """Per-sample x0-reconstruction loss ``(B,)`` weighted by 1 / (1 - alpha_bar_t) (the v-loss, exactly)."""
        from consisid_lab.models.diffusion import v_to_x0, weighted_x0_loss

        x_t = self.noise_scheduler.add_noise(x0, noise, t)
        x0_hat = v_to_x0(self.noise_scheduler, x_t, self.denoise(x_t, t, text, g, tokens), t)
        alphas_cumprod = self.noise_scheduler.alphas_cumprod.to(self.device)[t]  # (B,)
        return weighted_x0_loss(x0_hat, x0, alphas_cumprod, mask=mask, weight_cap=self.loss_cfg.get("weight_cap"))

    def _latent_mask(self, face_mask: Tensor, latent_shape: torch.Size) -> Tensor:
        """Face mask ``(B, F, 1, H, W)`` -> latent grid ``(B, f, 1, h, w)`` (any pixel of a cell counts)."""
        b, f, _, h, w = latent_shape
        m = face_mask.flatten(0, 1).float()  # (B*F, 1, H, W)
        m = F.adaptive_max_pool2d(m, (h, w)).view(b, -1, 1, h, w)
        if m.shape[1] != f:  # temporal compression: a latent frame covers several frames
            m = F.adaptive_max_pool3d(m.transpose(1, 2), (f, h, w)).transpose(1, 2)
        return m

    def _stage_clip(self, batch: VideoBatch) -> VideoBatch:
        """Shorten clips to the current stage's ``num_frames`` (hierarchical training on short clips first)."""
        if not self.stages or self._current_stage is None:
            return batch
        n = self.stages[self._current_stage].num_frames
        if n is None or n >= batch.video.shape[1]:
            return batch
        self.vae.check_size(n, batch.video.shape[3], batch.video.shape[4])
        cached = dict(batch.cached)
        if "latents" in cached:
            cached["latents"] = cached["latents"][:, : self.vae.num_latent_frames(n)]
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
        import os

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
        from consisid_lab.models.diffusion import sample

        face = batch.ref_face if face is None else face
        kps = batch.ref_kps if kps is None else kps
        b, num_frames, _, height, width = batch.video.shape
        f, c, h, w = self.vae.latent_shape(num_frames, height, width)
        g, tokens, _ = self.identity_conditions(face, kps, f)
        text = self.encode_text(list(batch.caption))
        guidance = float(self.sampling_cfg.get("guidance_scale", 1.0) if guidance_scale is None else guidance_scale)
        uncond = self.encode_text([""] * b) if guidance != 1.0 else None

        def model_fn(x_t: Tensor, t: Tensor, cond: dict[str, Any]) -> Tensor:
            return self.denoise(x_t, t, cond["text"], g, tokens)

        generator = torch.Generator(device="cpu").manual_seed(seed)
        latents = sample(
            model_fn,
            shape=(b, f, c, h, w),
            scheduler=self.noise_scheduler,
            num_steps=int(self.sampling_cfg.get("num_steps", 10) if num_steps is None else num_steps),
            guidance_scale=guidance,
            use_dynamic_cfg=bool(self.sampling_cfg.get("use_dynamic_cfg", False)),
            cond={"text": text},
            uncond={"text": uncond} if uncond is not None else None,
            generator=generator,
            device=self.device,
            dtype=text.dtype,
        )
        return self.vae.decode(latents).clamp(-1, 1)

    def setup(self, stage: str) -> None:
        # Measuring instruments, not model parts: kept out of the state dict (a plain attribute).
        if self.benchmark_metrics is None and self.metrics_cfg is not None:
            from consisid_lab.metrics.finite import FiniteSamplesOnly

            self.benchmark_metrics = FiniteSamplesOnly(instantiate(self.metrics_cfg))

    def _eval_step(self, batch: VideoBatch, batch_idx: int, prefix: str) -> None:
        # A deterministic denoising loss at fixed timesteps: comparable across runs and epochs.
        gen = torch.Generator(device="cpu").manual_seed(1234 + batch_idx)
        x0 = self._latents(batch)
        text = self.encode_text(list(batch.caption))
        g, tokens, _ = self.identity_conditions(batch.ref_face, batch.ref_kps, x0.shape[1])
        losses = []
        num_t = self.noise_scheduler.config.num_train_timesteps
        for frac in (0.1, 0.5, 0.9):
            t = torch.full((x0.shape[0],), int(frac * (num_t - 1)), device=self.device, dtype=torch.long)
            noise = torch.randn(x0.shape, generator=gen).to(x0)
            losses.append(self._denoising_loss(x0, noise, t, text, g, tokens).mean())
        self.log(f"{prefix}/loss", torch.stack(losses).mean(), batch_size=batch.batch_size, sync_dist=True)

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
        f, _, h, w = self.vae.latent_shape(b.video.shape[1], b.video.shape[3], b.video.shape[4])
        p = self.backbone.patch_size
        return (self.text_encoder.max_length, f, h // p, w // p)

    @torch.no_grad()
    def denoise_once(self, batch: VideoBatch, timestep: int) -> Tensor:
        x0 = self._latents(batch)
        gen = torch.Generator(device="cpu").manual_seed(0)
        noise = torch.randn(x0.shape, generator=gen).to(x0)
        t = torch.full((x0.shape[0],), int(timestep), device=self.device, dtype=torch.long)
        x_t = self.noise_scheduler.add_noise(x0, noise, t)
        g, tokens, _ = self.identity_conditions(batch.ref_face, batch.ref_kps, x0.shape[1])
        return self.denoise(x_t, t, self.encode_text(list(batch.caption)), g, tokens)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["run_config"] = self.run_config
        checkpoint["stability"] = dict(self.stability)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.run_config = checkpoint.get("run_config")
        self.stability.update(checkpoint.get("stability") or {})

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> Any:
        """AdamW with one parameter group per module prefix (named, so stages can retune their learning rates)."""
        cfg = self.optimizer_cfg
        base_lr = float(cfg.get("lr", 1e-4))
        multipliers: dict[str, float] = dict(cfg.get("lr_multipliers") or {})
        prefixes = set(multipliers) | {m for st in self.stages for m in st.lr_multipliers}
        groups: dict[str, list[torch.nn.Parameter]] = {}
        for name, p in self.named_parameters():
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
            lr=base_lr,
            betas=tuple(cfg.get("betas", (0.9, 0.999))),
            weight_decay=float(cfg.get("weight_decay", 0.0)),
            eps=float(cfg.get("eps", 1e-8)),
        )
        warmup = int(cfg.get("warmup_steps", 0))
        if warmup <= 0:
            return opt
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _build_fuser(cfg: DictConfig | dict, local_encoder: Any) -> torch.nn.Module:
    """The fuser gets its input sizes from what the local encoder declares."""
    vector_dim = sum(local_encoder.vector_dims.values())
    token_dims = list(local_encoder.token_dims.values())
    target = str(cfg.get("_target_", ""))
    if target.endswith("PerceiverFuser") and not token_dims:
        raise ValueError(
            f"model/fuser=perceiver needs token maps from the local encoder, but "
            f"{type(local_encoder).__name__} gives only vectors {list(local_encoder.vector_dims)}; "
            "pick model/fuser=mlp or a local encoder with tokens (clip, or arcface_layer=penultimate)"
        )
    if target.endswith("ConcatFuser"):
        return instantiate(
            cfg, id_dim=vector_dim, token_dims=token_dims, vector_dims=list(local_encoder.vector_dims.values())
        )
    return instantiate(cfg, id_dim=vector_dim, token_dims=token_dims)
