"""What the frozen encoders make of each training clip, computed once before training.

The codec, the keypoint renderer, the global encoder and the local encoder are frozen, and the embedded benchmark's
clips are a function of their index, so their outputs for a clip never change: the video latents, and the global
latent and local-encoder features of the in-clip reference (``intra_face``). Computing them once, in a fixed order
and fixed batches, takes a sixth off each default training step. The cross-face reference gets fresh Gaussian noise
every step (``model.loss.cross_face_noise``), so its global latent and features are still computed each step, for
those samples only.

Exactness: the memo is built in the same batches whatever the run's history, so a resumed run reads exactly the
values the uninterrupted run read; the samples of a step that need fresh encodings are chosen by the step's
generator, so they are the same too.

It applies only where those values are fixed (:func:`memo_unavailable` says why not, otherwise): the synthetic
benchmark's training split, a deterministic codec (no ``sample_posterior``), no image noise on the global route
(``image_noise``), and clips of the length the memo was built at (a coarse-to-fine stage that shortens clips
computes its encodings each step).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from consisid_lab.types import IdentityFeatures, VideoBatch

if TYPE_CHECKING:
    from consisid_lab.models.denoiser import IdentityDenoiser
    from consisid_lab.models.objective import LossSettings

log = logging.getLogger(__name__)


def memo_unavailable(dataset: Any, settings: LossSettings) -> str | None:
    """Why the frozen outputs of ``dataset``'s clips cannot be memoised under ``settings``; None when they can."""
    from consisid_lab.data.datamodule import SyntheticClipDataset

    if not isinstance(dataset, SyntheticClipDataset):
        return f"the training data ({type(dataset).__name__}) is not the synthetic benchmark's, whose clips are fixed"
    if settings.sample_posterior:
        return "model.loss.sample_posterior=true draws new latents every step"
    if settings.image_noise:
        return "model.loss.image_noise=true perturbs the global route's images every step"
    return None


@dataclass
class FrozenFeatureMemo:
    """Per clip (the dataset index, ``VideoBatch.clip_id``): video latents ``(f, C, h, w)``, the intra reference's
    global latent ``(f, C_g, h, w)`` (or None without a global route) and its local-encoder features (row tensors;
    None without a local route)."""

    num_frames: int
    latents: dict[int, Tensor] = field(default_factory=dict)
    global_latent: dict[int, Tensor | None] = field(default_factory=dict)
    features: dict[int, IdentityFeatures | None] = field(default_factory=dict)

    @classmethod
    @torch.no_grad()
    def build(cls, denoiser: IdentityDenoiser, dataset: Any, batch_size: int) -> FrozenFeatureMemo:
        """Encode every clip of ``dataset`` in index order, ``batch_size`` at a time."""
        from consisid_lab.data.datamodule import collate_video_batch

        start = time.perf_counter()
        memo: FrozenFeatureMemo | None = None
        device = next(denoiser.parameters()).device
        for lo in range(0, len(dataset), batch_size):
            batch = collate_video_batch([dataset[i] for i in range(lo, min(lo + batch_size, len(dataset)))])
            batch = batch.to(device)
            if memo is None:
                memo = cls(num_frames=batch.video.shape[1])
            latents = denoiser.vae.encode(batch.video)
            g, feats = denoiser.frozen_identity(batch.intra_face, batch.intra_kps, latents.shape[1])
            for row, clip in enumerate(batch.clip_id.tolist()):
                memo.latents[clip] = latents[row].clone()
                memo.global_latent[clip] = None if g is None else g[row].clone()
                memo.features[clip] = None if feats is None else _rows(feats, [row])
        if memo is None:
            raise ValueError("the training split has no clips: nothing to memoise")
        log.info(
            "frozen encoder outputs of %d training clips computed in %.1f s (reused every step)",
            len(memo.latents),
            time.perf_counter() - start,
        )
        return memo

    def covers(self, batch: VideoBatch) -> bool:
        """Whether every clip of ``batch`` is memoised at the batch's clip length. A batch whose video is not finite
        (corrupt input) is never covered: it is encoded as it is, so its loss shows the fault (model.nan_policy)."""
        if batch.video.shape[1] != self.num_frames or not all(c in self.latents for c in batch.clip_id.tolist()):
            return False
        return bool(torch.isfinite(batch.video).all())

    def video_latents(self, batch: VideoBatch) -> Tensor:
        """``(B, f, C, h, w)`` for a batch that :meth:`covers`."""
        return torch.stack([self.latents[c] for c in batch.clip_id.tolist()]).to(batch.video.device)

    def identity(
        self, denoiser: IdentityDenoiser, batch: VideoBatch, face: Tensor, kps: Tensor, use_cross: Tensor, f: int
    ) -> tuple[Tensor | None, IdentityFeatures | None]:
        """The global latent ``(B, f, C_g, h, w)`` and local features of the step's references: memoised for the
        intra references, computed now (on the noisy faces ``face``) for the cross-face ones (``use_cross``)."""
        clips = batch.clip_id.tolist()
        cross = [i for i, c in enumerate(use_cross.tolist()) if c]
        fresh_g, fresh_f = (None, None)
        if cross:
            with torch.no_grad():
                fresh_g, fresh_f = denoiser.frozen_identity(face[cross], kps[cross], f)
        position = {row: k for k, row in enumerate(cross)}
        g_rows: list[Tensor] = []
        f_rows: list[IdentityFeatures] = []
        for row, clip in enumerate(clips):
            if row in position:
                k = position[row]
                g = None if fresh_g is None else fresh_g[k]
                feats = None if fresh_f is None else _rows(fresh_f, [k])
            else:
                g, feats = self.global_latent[clip], self.features[clip]
            if g is not None:
                g_rows.append(g.to(face.device))
            if feats is not None:
                f_rows.append(feats)
        g_out = torch.stack(g_rows) if len(g_rows) == len(clips) else None
        f_out = _concat(f_rows).to(face.device) if len(f_rows) == len(clips) else None
        return g_out, f_out


def _rows(feats: IdentityFeatures, rows: list[int]) -> IdentityFeatures:
    return IdentityFeatures(
        vectors={k: v[rows].clone() for k, v in feats.vectors.items()},
        tokens={k: v[rows].clone() for k, v in feats.tokens.items()},
    )


def _concat(parts: list[IdentityFeatures]) -> IdentityFeatures:
    first = parts[0]
    return IdentityFeatures(
        vectors={k: torch.cat([p.vectors[k] for p in parts]) for k in first.vectors},
        tokens={k: torch.cat([p.tokens[k] for p in parts]) for k in first.tokens},
    )
