"""All benchmark metrics of a validation / test pass, computed with the evaluator stand-ins.

A plain object (not an ``nn.Module``) on purpose: the evaluators are measuring instruments, not part of the
model, so they stay out of the model's ``state_dict`` and checkpoints.
"""

from __future__ import annotations

import torch
from torch import Tensor

from consisid_lab.types import VideoBatch


class BenchmarkMetrics:
    """FaceSim against each clip's own reference and against a shuffled one (the chance level), FaceSim-Low,
    FaceSim-High, identity drift across frames and dataset-level FID on evaluator features.

    Every identity score is gated by the face gate (a frame without a face scores 0) and ``face_rate`` is the
    share of generated frames with a face. ``facesim_real`` / ``facesim_real_shuffled`` are the same FaceSim on the
    real clips (the ceiling a perfect generator reaches, and its chance level); ``identity_gap`` =
    ``facesim - facesim_shuffled`` and ``identity_gap_real`` its real-clip counterpart. ``identity_gap_low`` /
    ``identity_gap_high`` (and their ``_real`` counterparts) are the same gap with a band evaluator: a face whose
    FaceSim-High is only what any face of that shape scores (as high against another identity's reference) has a
    high-band gap of 0. ``copy_paste`` compares how
    close generated and real frames are to the reference image itself; ``hf_energy_ratio`` is the generated / real
    ratio of the mean absolute difference of horizontally adjacent pixels (per-pixel noise scores far above 1, a
    blurred video below); ``hf_energy_ratio_face`` / ``hf_energy_ratio_background`` split it by the real clip's
    face mask (a pixel pair counts as face when either pixel is in it), so an excess is placed on the face or on
    the background. ``background_error`` is how far the generated background's colour is from the real
    clip's (same caption; ``consisid_lab.metrics.background``), ``background_error_shuffled`` from another clip's,
    and ``background_gap`` their difference (0: the caption's background is not followed; ``background_gap_real``,
    the real clips' own, is the ceiling).
    """

    def __init__(self, cache_dir: str | None = None, recipe: str = "default") -> None:
        from consisid_lab.encoders.recipes import named_recipe
        from consisid_lab.encoders.store import load_standins
        from consisid_lab.metrics.background import BackgroundError
        from consisid_lab.metrics.face_fid import FaceFID
        from consisid_lab.metrics.facesim import CopyPaste, FaceRate, FaceSim, FaceSimHigh, FaceSimLow
        from consisid_lab.metrics.identity_drift import IdentityDrift

        standins = load_standins(cache_dir, recipe=named_recipe(recipe))
        gate = standins.face_gate
        self.metrics = {
            "facesim": FaceSim(standins.evaluator, gate),
            "facesim_shuffled": FaceSim(standins.evaluator, gate),
            "facesim_real": FaceSim(standins.evaluator, gate),
            "facesim_real_shuffled": FaceSim(standins.evaluator, gate),
            "facesim_low": FaceSimLow(standins.evaluator_low, gate),
            "facesim_high": FaceSimHigh(standins.evaluator_high, gate),
            "facesim_low_shuffled": FaceSimLow(standins.evaluator_low, gate),
            "facesim_high_shuffled": FaceSimHigh(standins.evaluator_high, gate),
            "facesim_low_real": FaceSimLow(standins.evaluator_low, gate),
            "facesim_high_real": FaceSimHigh(standins.evaluator_high, gate),
            "facesim_low_real_shuffled": FaceSimLow(standins.evaluator_low, gate),
            "facesim_high_real_shuffled": FaceSimHigh(standins.evaluator_high, gate),
            "face_rate": FaceRate(gate),
            "face_rate_real": FaceRate(gate),
            "copy_paste": CopyPaste(),
            "id_drift": IdentityDrift(standins.evaluator),
            "fid": FaceFID(standins.evaluator),
            "background_error": BackgroundError(),
            "background_error_shuffled": BackgroundError(),
            "background_error_real_shuffled": BackgroundError(),
        }
        self._hf = dict.fromkeys(HF_KEYS, 0.0)
        self._updates = 0

    def to(self, device: torch.device | str) -> BenchmarkMetrics:
        for m in self.metrics.values():
            m.to(device)
        return self

    @torch.no_grad()
    def update(self, batch: VideoBatch, video: Tensor) -> None:
        """``video``: generated ``(B, F, 3, H, W)`` in [-1, 1] for the batch's captions and references."""
        device = video.device
        self.to(device)
        ref = batch.ref_face
        m = self.metrics
        if video.shape != batch.video.shape:
            raise ValueError(
                f"generated video {tuple(video.shape)} and the batch's real video {tuple(batch.video.shape)} "
                "must have the same shape"
            )
        m["facesim"].update(ref, video)
        m["facesim_real"].update(ref, batch.video)
        m["facesim_low"].update(ref, video)
        m["facesim_high"].update(ref, video)
        m["facesim_low_real"].update(ref, batch.video)
        m["facesim_high_real"].update(ref, batch.video)
        m["face_rate"].update(video)
        m["face_rate_real"].update(batch.video)
        m["copy_paste"].update(ref, batch.video, video)
        m["id_drift"].update(ref, video)
        m["fid"].update(batch.video, video)
        m["background_error"].update(batch.video, video)
        # Energy sums per region; the whole frame's is the face's plus the background's.
        face_pairs = horizontal_pair_mask(batch.face_mask)
        for name, clip in (("generated", video), ("real", batch.video)):
            diff = (clip[..., 1:] - clip[..., :-1]).abs().sum(2, keepdim=True)
            self._hf[f"{name}_face"] += float((diff * face_pairs).sum())
            self._hf[f"{name}_background"] += float((diff * (1 - face_pairs)).sum())
        # Shuffled reference: each video against the reference of a clip of another identity.
        other = _other_identity_index(batch.identity)
        if other is not None:
            m["facesim_shuffled"].update(ref[other], video)
            m["facesim_real_shuffled"].update(ref[other], batch.video)
            for band in ("low", "high"):
                m[f"facesim_{band}_shuffled"].update(ref[other], video)
                m[f"facesim_{band}_real_shuffled"].update(ref[other], batch.video)
            m["background_error_shuffled"].update(batch.video[other], video)
            m["background_error_real_shuffled"].update(batch.video[other], batch.video)
        self._updates += 1

    def has_updates(self) -> bool:
        return self._updates > 0

    def compute(self) -> dict[str, Tensor]:
        out = {}
        for name, metric in self.metrics.items():
            if getattr(metric, "_update_count", 1) == 0:
                continue
            out[name] = metric.compute()
        if "facesim_shuffled" in out:
            out["identity_gap"] = out["facesim"] - out["facesim_shuffled"]
            out["identity_gap_real"] = out["facesim_real"] - out["facesim_real_shuffled"]
            for band in ("low", "high"):  # the same gap in each identity band: which band's identity is carried
                out[f"identity_gap_{band}"] = out[f"facesim_{band}"] - out[f"facesim_{band}_shuffled"]
                out[f"identity_gap_{band}_real"] = out[f"facesim_{band}_real"] - out[f"facesim_{band}_real_shuffled"]
            out["background_gap"] = out["background_error_shuffled"] - out["background_error"]
            # the real clip's own error is 0: its gap is the chance level
            out["background_gap_real"] = out["background_error_real_shuffled"]
        generated = self._hf["generated_face"] + self._hf["generated_background"]
        real = self._hf["real_face"] + self._hf["real_background"]
        if real > 0:
            out["hf_energy_ratio"] = torch.tensor(generated / real)
        for region in ("face", "background"):
            if self._hf[f"real_{region}"] > 0:
                out[f"hf_energy_ratio_{region}"] = torch.tensor(
                    self._hf[f"generated_{region}"] / self._hf[f"real_{region}"]
                )
        return out

    def reset(self) -> None:
        for m in self.metrics.values():
            m.reset()
        self._hf = dict.fromkeys(HF_KEYS, 0.0)
        self._updates = 0


HF_KEYS = ("generated_face", "real_face", "generated_background", "real_background")


def horizontal_pair_mask(face_mask: Tensor) -> Tensor:
    """``(B, F, 1, H, W-1)`` float: 1 where a pair of horizontally adjacent pixels touches the face mask."""
    m = face_mask.float()
    return torch.maximum(m[..., 1:], m[..., :-1])


def horizontal_energy(video: Tensor) -> Tensor:
    """Per-clip mean absolute difference of horizontally adjacent pixels ``(B,)`` of ``(B, F, 3, H, W)`` videos."""
    return (video[..., 1:] - video[..., :-1]).abs().flatten(1).mean(1)


def _other_identity_index(identity: Tensor) -> Tensor | None:
    """For each item, the index of the nearest later item (cyclically) with a different identity; None if all equal."""
    ids = identity.tolist()
    n = len(ids)
    out = []
    for i in range(n):
        j = next((k % n for k in range(i + 1, i + n) if ids[k % n] != ids[i]), None)
        if j is None:
            return None
        out.append(j)
    return torch.tensor(out, device=identity.device)
