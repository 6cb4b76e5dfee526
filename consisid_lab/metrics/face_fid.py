"""FaceFID: Frechet distance between real and generated frames in the evaluator's embedding space.

Dataset-level (means and covariances accumulated over every frame seen), unlike the released evaluation
script which compares one reference with one frame. torchmetrics' FID machinery does the accumulation and the
matrix square root; only the feature extractor is ours.
"""

from __future__ import annotations

from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance

from consisid_lab.metrics.evaluator_frozen import FrozenEmbedder
from consisid_lab.utils.faults import NonFiniteInputError, nonfinite_summary, require_finite


def _as_images(x: Tensor, name: str) -> Tensor:
    if x.ndim == 5 and x.shape[2] == 3:
        return x.flatten(0, 1)  # (B * F, 3, H, W)
    if x.ndim == 4 and x.shape[1] == 3:
        return x
    raise ValueError(f"{name} must be images (B, 3, H, W) or videos (B, F, 3, H, W) in [-1, 1], got {tuple(x.shape)}")


class FaceFID(FrechetInceptionDistance):
    """FID on evaluator embeddings. ``update(real, generated)``: images or videos in [-1, 1]; lower is better."""

    def __init__(self, evaluator: nn.Module, reset_real_features: bool = True, **kwargs) -> None:
        embedder = FrozenEmbedder(evaluator)
        if not hasattr(embedder, "num_features"):
            raise ValueError(
                f"FaceFID needs an evaluator with an `embed_dim` attribute, got {type(evaluator).__name__}"
            )
        super().__init__(feature=embedder, reset_real_features=reset_real_features, normalize=False, **kwargs)

    def update(self, real: Tensor | None, generated: Tensor | None) -> None:  # type: ignore[override]
        """Accumulate features of real and/or generated frames (pass ``None`` to skip one side)."""
        require_finite(type(self).__name__, real=real, generated=generated)
        if real is not None:
            super().update(_as_images(real, "real"), real=True)
        if generated is not None:
            super().update(_as_images(generated, "generated"), real=False)

    def compute(self) -> Tensor:
        # Non-finite statistics make the matrix square root's LAPACK calls crash the process, not raise.
        for name in ("real_features_sum", "real_features_cov_sum", "fake_features_sum", "fake_features_cov_sum"):
            problem = nonfinite_summary(getattr(self, name))
            if problem is not None:
                raise NonFiniteInputError(
                    f"{type(self).__name__}: accumulated {name} is not finite ({problem}); the evaluator's features "
                    "overflowed, so no FID is computed"
                )
        return super().compute()
