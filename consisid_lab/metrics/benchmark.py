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

    ``facesim_real`` is the same FaceSim on the real clips: the ceiling a perfect generator would reach.
    """

    def __init__(self, cache_dir: str | None = None, recipe: str = "default") -> None:
        from consisid_lab.encoders.recipes import named_recipe
        from consisid_lab.encoders.store import load_standins
        from consisid_lab.metrics.face_fid import FaceFID
        from consisid_lab.metrics.facesim import FaceSim, FaceSimHigh, FaceSimLow
        from consisid_lab.metrics.identity_drift import IdentityDrift

        standins = load_standins(cache_dir, recipe=named_recipe(recipe))
        self.metrics = {
            "facesim": FaceSim(standins.evaluator),
            "facesim_shuffled": FaceSim(standins.evaluator),
            "facesim_real": FaceSim(standins.evaluator),
            "facesim_low": FaceSimLow(standins.evaluator_low),
            "facesim_high": FaceSimHigh(standins.evaluator_high),
            "id_drift": IdentityDrift(standins.evaluator),
            "fid": FaceFID(standins.evaluator),
        }
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
        m["facesim"].update(ref, video)
        m["facesim_real"].update(ref, batch.video)
        m["facesim_low"].update(ref, video)
        m["facesim_high"].update(ref, video)
        m["id_drift"].update(ref, video)
        m["fid"].update(batch.video, video)
        # Shuffled reference: each video against the reference of a clip of another identity.
        other = _other_identity_index(batch.identity)
        if other is not None:
            m["facesim_shuffled"].update(ref[other], video)
        self._updates += 1

    def has_updates(self) -> bool:
        return self._updates > 0

    def compute(self) -> dict[str, Tensor]:
        out = {}
        for name, metric in self.metrics.items():
            if getattr(metric, "_update_count", 1) == 0:
                continue
            out[name] = metric.compute()
        return out

    def reset(self) -> None:
        for m in self.metrics.values():
            m.reset()
        self._updates = 0


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
