"""Real identity metrics of generated videos, as the paper's evaluation computes them, from local weights only.

- **FaceSim-Arc**: cosine between the ArcFace embedding (insightface ``antelopev2``: SCRFD detector + glintr100) of the
  reference face and of the face in each of ``num_frames`` frames sampled evenly over the video, clamped at 0 and
  averaged over the frames with a face (the released ``eval/get_facesim_fid.py`` does the same).
- **FaceSim-Cur**: the same with CurricularFace IR-101 (``glint360k_curricular_face_r101_backbone.bin``).
- **Face rate**: share of the sampled frames in which the detector finds a face.
- **CLIPScore**: torchmetrics' ``CLIPScore`` between each sampled frame and the video's prompt, averaged; the CLIP
  model is read from a local Hugging Face directory.
- **FID**: torchmetrics' ``FrechetInceptionDistance`` (2048-d pool features, torch-fidelity's Inception with a local
  weight file ``pt_inception-2015-12-05-6726825d.pth``) between the aligned reference faces and the aligned generated
  faces, at dataset level (the released script averages one-image-vs-one-image distances instead).

All encoders see the same face: one detection per frame (the pack's SCRFD; MediaPipe where the pack has no
detector, with the face-mesh confirmation of :data:`~consisid_lab.faces.analysis.MESH_AGREEMENT`), aligned once to
insightface's ArcFace template at 112 x 112 (``face_align.norm_crop``). Every weight file is checked by
:func:`check_weights` before any video is decoded; a missing one is an error naming the file and the directory
searched. The released script aligns at 224 and resizes to 112 for CurricularFace; here both encoders get the same
112 crop.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

logger = logging.getLogger(__name__)

METRIC_NAMES = ("facesim_arc", "facesim_cur", "face_rate", "clipscore", "fid")
FID_FEATURES = 2048
INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
CURRICULARFACE_FILE = "glint360k_curricular_face_r101_backbone.bin"
ARCFACE_PACK_FILES = ("glintr100.onnx", "scrfd_10g_bnkps.onnx")  # antelopev2
CLIP_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")  # transformers 4 / 5 names
CLIP_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
NUM_FRAMES = 16  # the paper's evaluation samples 16 frames per video


@dataclass
class RealMetricsConfig:
    """Where the weights are (``conf/metrics/real.yaml``) and which metrics run."""

    arcface_dir: str | None = None  # an insightface pack folder (antelopev2)
    curricularface: str | None = None  # the CurricularFace state-dict file
    clip_dir: str | None = None  # a local Hugging Face CLIP folder (e.g. openai/clip-vit-large-patch14)
    inception: str | None = None  # torch-fidelity's FID Inception weight file
    metrics: list[str] = field(default_factory=lambda: list(METRIC_NAMES))
    num_frames: int = NUM_FRAMES

    def __post_init__(self) -> None:
        self.metrics = list(self.metrics)
        unknown = sorted(set(self.metrics) - set(METRIC_NAMES))
        if unknown:
            raise ValueError(f"unknown real metrics {unknown}; pick from {list(METRIC_NAMES)}")
        if int(self.num_frames) < 1:
            raise ValueError(f"metrics.num_frames={self.num_frames} must be >= 1")


def _need(path: str | None, what: str, key: str, expected: str) -> Path:
    if not path:
        raise FileNotFoundError(f"{what} needs {expected}; set metrics.{key}=PATH (no weights are downloaded)")
    return Path(path)


def check_weights(cfg: RealMetricsConfig) -> dict[str, Path]:
    """The weight files of the enabled metrics; ``FileNotFoundError`` naming the file and the directory searched."""
    found: dict[str, Path] = {}
    wants = set(cfg.metrics)
    if wants & {"facesim_arc", "facesim_cur", "face_rate", "fid"}:  # every face metric needs the detector + aligner
        d = _need(cfg.arcface_dir, "FaceSim-Arc and face detection", "arcface_dir", "an insightface antelopev2 folder")
        rec = d / ARCFACE_PACK_FILES[0]
        if not rec.is_file():
            raise FileNotFoundError(
                f"FaceSim-Arc: {rec.name} not found in {d} (searched {d.resolve()}); metrics.arcface_dir must be "
                f"the antelopev2 folder with {' + '.join(ARCFACE_PACK_FILES)}"
            )
        found["arcface"] = rec
        if (d / ARCFACE_PACK_FILES[1]).is_file():
            found["detector"] = d / ARCFACE_PACK_FILES[1]
        else:
            logger.warning("%s has no %s: faces are detected with MediaPipe", d, ARCFACE_PACK_FILES[1])
    if "facesim_cur" in wants:
        f = _need(cfg.curricularface, "FaceSim-Cur", "curricularface", f"the file {CURRICULARFACE_FILE}")
        if not f.is_file():
            raise FileNotFoundError(f"FaceSim-Cur: {f.name} not found in {f.parent.resolve()}")
        found["curricularface"] = f
    if "clipscore" in wants:
        d = _need(cfg.clip_dir, "CLIPScore", "clip_dir", "a local Hugging Face CLIP folder")
        if not (d / "config.json").is_file():
            raise FileNotFoundError(f"CLIPScore: config.json not found in {d.resolve()} (metrics.clip_dir)")
        if not any((d / name).is_file() for name in CLIP_PROCESSOR_FILES):
            raise FileNotFoundError(f"CLIPScore: none of {list(CLIP_PROCESSOR_FILES)} found in {d.resolve()}")
        weights = next((d / w for w in CLIP_WEIGHTS if (d / w).is_file()), None)
        if weights is None:
            raise FileNotFoundError(f"CLIPScore: none of {list(CLIP_WEIGHTS)} found in {d.resolve()}")
        found["clip"] = weights
    if "fid" in wants:
        f = _need(cfg.inception, "FID", "inception", f"torch-fidelity's Inception weights {INCEPTION_FILE}")
        if not f.is_file():
            raise FileNotFoundError(f"FID: {f.name} not found in {f.parent.resolve()} (metrics.inception)")
        found["inception"] = f
    return found


def file_digest(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()[:16]


def cosine_scores(ref: Tensor, frames: Tensor) -> Tensor:
    """``max(0, cos)`` between one embedding ``(D,)`` and frame embeddings ``(N, D)``: ``(N,)``."""
    return torch.nn.functional.cosine_similarity(ref[None].float(), frames.float(), dim=-1).clamp_min(0.0)


def bootstrap_ci(values: list[float], num: int = 1000, seed: int = 0, level: float = 0.95) -> list[float] | None:
    """Percentile bootstrap interval of the mean over videos (``None`` with fewer than two values)."""
    x = np.asarray([v for v in values if v is not None and np.isfinite(v)], np.float64)
    if len(x) < 2:
        return None
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(num, len(x)))].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return [float(lo), float(hi)]


class ProjectedCLIP(torch.nn.Module):
    """A Hugging Face ``CLIPModel`` whose ``get_*_features`` return the projected embeddings as tensors.

    transformers 5 returns a model output (projected embedding in ``pooler_output``) where torchmetrics 1.9's
    CLIPScore expects the tensor itself; this adapter gives it the tensor, nothing else changes.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    @staticmethod
    def _tensor(out) -> Tensor:
        return out if isinstance(out, Tensor) else out.pooler_output

    def get_image_features(self, *args, **kwargs) -> Tensor:
        return self._tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs) -> Tensor:
        return self._tensor(self.model.get_text_features(*args, **kwargs))


def _local_clip(folder: Path):
    """A loader for torchmetrics' CLIPScore that reads a local folder and never goes online."""

    def load():
        from transformers import CLIPModel, CLIPProcessor

        model = CLIPModel.from_pretrained(folder, local_files_only=True).eval()
        return ProjectedCLIP(model), CLIPProcessor.from_pretrained(folder, local_files_only=True)

    return load


@dataclass
class VideoScores:
    """One video's scores (``None`` where a metric does not apply, e.g. FaceSim without any face)."""

    video: str
    reference: str
    prompt: str
    frames: int
    faces: int
    face_rate: float
    facesim_arc: float | None = None
    facesim_cur: float | None = None
    clipscore: float | None = None


class RealMetrics:
    """The real metrics over a set of (video, reference photo, prompt) triples. Build it from checked files with
    :meth:`from_config`; :meth:`score_video` scores one video and feeds the dataset-level FID."""

    def __init__(self, cfg: RealMetricsConfig, files: dict[str, Path]) -> None:
        from consisid_lab.faces.analysis import MESH_AGREEMENT
        from consisid_lab.faces.arcface import InsightFaceArcFace

        self.cfg = cfg
        self.files = files
        wants = set(cfg.metrics)
        self.arcface = None
        if "arcface" in files:
            self.arcface = InsightFaceArcFace(
                files["arcface"].parent, rec_name=files["arcface"].name,
                det_name=files["detector"].name if "detector" in files else None, mesh_agreement=MESH_AGREEMENT,
            )  # fmt: skip
        self.curricular = None
        if "facesim_cur" in wants:
            from consisid_lab.faces.curricularface import CurricularFace

            self.curricular = CurricularFace(files["curricularface"])
        self.clip = None
        if "clipscore" in wants:
            from torchmetrics.multimodal.clip_score import CLIPScore

            self.clip = CLIPScore(model_name_or_path=_local_clip(files["clip"].parent))
        self.fid = None
        if "fid" in wants:
            from torchmetrics.image.fid import FrechetInceptionDistance

            self.fid = FrechetInceptionDistance(
                feature=FID_FEATURES, feature_extractor_weights_path=str(files["inception"])
            )
        self._fid_counts = [0, 0]  # (real, generated) faces fed to FID

    @classmethod
    def from_config(cls, cfg: RealMetricsConfig) -> RealMetrics:
        return cls(cfg, check_weights(cfg))

    def versions(self) -> dict[str, Any]:
        """What produced the numbers: detector, alignment and encoder files (name and content hash), libraries."""
        import insightface
        import torchmetrics

        from consisid_lab.faces.analysis import MESH_AGREEMENT

        out: dict[str, Any] = {
            "files": {k: {"name": p.name, "sha256_16": file_digest(p)} for k, p in self.files.items()},
            "detector": self.files["detector"].name if "detector" in self.files else "mediapipe face_detection",
            "alignment": f"insightface {insightface.__version__} face_align.norm_crop, ArcFace template, 112 px",
            "torchmetrics": torchmetrics.__version__,
            "num_frames": self.cfg.num_frames,
        }
        if "detector" not in self.files:
            import mediapipe

            out["detector"] += f" (mediapipe {mediapipe.__version__}, mesh agreement {MESH_AGREEMENT})"
        return out

    # --------------------------------------------------------------------------------------------- faces
    def aligned_face(self, image: np.ndarray) -> np.ndarray | None:
        """The largest face of an RGB image on the ArcFace template ``(112, 112, 3)``, or ``None``."""
        from consisid_lab.faces.analysis import NoFaceError, align_face

        assert self.arcface is not None
        try:
            face = self.arcface.detect(image)
        except NoFaceError:
            return None
        return align_face(image, face.kps)

    def _embed(self, aligned: np.ndarray) -> dict[str, Tensor]:
        """ArcFace and CurricularFace embeddings of aligned faces ``(N, 112, 112, 3)``."""
        out = {}
        if "facesim_arc" in self.cfg.metrics:
            out["arc"] = self.arcface.features(aligned).vectors["arcface"]  # (N, 512)
        if self.curricular is not None:
            x = torch.from_numpy(aligned).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (N, 3, 112, 112) in [-1, 1]
            out["cur"] = self.curricular.embed(x)  # (N, 512)
        return out

    @staticmethod
    def _uint8(aligned: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(aligned)).permute(0, 3, 1, 2).contiguous()  # (N, 3, h, w)

    # --------------------------------------------------------------------------------------------- scoring
    def score_video(
        self, frames: np.ndarray, reference: np.ndarray, prompt: str, video: str = "", reference_name: str = ""
    ) -> VideoScores:
        """Scores of frames ``(N, H, W, 3)`` uint8 (already sampled) against a reference photo ``(h, w, 3)``."""
        from consisid_lab.faces.analysis import NoFaceError

        n = len(frames)
        faces = [self.aligned_face(f) for f in frames] if self.arcface is not None else []
        found = [f for f in faces if f is not None]
        scores = VideoScores(video, reference_name, prompt, n, len(found), len(found) / n if n else 0.0)
        if self.arcface is not None:
            ref = self.aligned_face(reference)
            if ref is None:
                raise NoFaceError(f"no face found in the reference photo {reference_name or 'given'}")
            if found:
                gen = np.stack(found)  # (K, 112, 112, 3)
                ref_e, gen_e = self._embed(ref[None]), self._embed(gen)
                if "arc" in ref_e:
                    scores.facesim_arc = float(cosine_scores(ref_e["arc"][0], gen_e["arc"]).mean())
                if "cur" in ref_e:
                    scores.facesim_cur = float(cosine_scores(ref_e["cur"][0], gen_e["cur"]).mean())
                if self.fid is not None:
                    self.fid.update(self._uint8(gen), real=False)
                    self._fid_counts[1] += len(gen)
            if self.fid is not None:
                self.fid.update(self._uint8(ref[None]), real=True)
                self._fid_counts[0] += 1
        if self.clip is not None:
            self.clip.reset()
            self.clip.update(torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2), [prompt] * n)
            scores.clipscore = float(self.clip.compute())
        return scores

    def fid_value(self) -> float | None:
        """Dataset-level FID of everything scored so far (``None`` with fewer than two faces on a side)."""
        if self.fid is None:
            return None
        if min(self._fid_counts) < 2:
            logger.warning("FID needs at least 2 real and 2 generated faces, got %s; not computed", self._fid_counts)
            return None
        return float(self.fid.compute())
