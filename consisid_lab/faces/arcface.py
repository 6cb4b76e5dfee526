"""ArcFace through insightface's ONNX models: the 512-d embedding and the penultimate spatial map.

A model directory is an insightface model pack: ``antelopev2`` (``glintr100.onnx`` recognition +
``scrfd_10g_bnkps.onnx`` detection, what ConsisID uses) or ``buffalo_l`` (``w600k_r50.onnx`` + ``det_10g.onnx``).
Other packs work when they hold one recognition model (insightface's router sees an ``ArcFaceONNX``: square input of
112) and optionally one detector (several outputs).

``layer="penultimate"`` is the paper's choice (the layer before the embedding keeps spatial information, given
instead of the embedding); the released code uses ``last``; ``both`` gives the two. Both come from the same ONNX
graph: the map is the input of the head's final Flatten/Reshape, found by walking the graph back from the embedding
output (never by a node name of one file), added as a second graph output and saved once to a cache keyed by the
file's hash.

The embedding is returned as the network emits it (not L2-normalised), like insightface's ``Face.embedding`` that
the released code feeds to its fuser.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from consisid_lab.faces.analysis import (
    ARCFACE_SIZE,
    FaceAnalyzer,
    FaceInfo,
    FacePolicy,
    align_face,
    describe,
    select_face,
    to_rgb_uint8,
)
from consisid_lab.models.local_encoder import arcface_outputs
from consisid_lab.types import IdentityFeatures

logger = logging.getLogger(__name__)

# (recognition, detection) file names of the insightface packs the project knows by name.
KNOWN_PACKS: dict[str, tuple[str, str]] = {
    "antelopev2": ("glintr100.onnx", "scrfd_10g_bnkps.onnx"),
    "buffalo_l": ("w600k_r50.onnx", "det_10g.onnx"),
}
# Ops that only carry a tensor through the embedding head (plus their weights): the walk back from the embedding
# output crosses them until it meets the Flatten/Reshape that turns the spatial map into a vector.
FLATTEN_OPS = ("Flatten", "Reshape")
DETECTOR_INPUT_SIZE = (640, 640)
VECTOR_KEY = "arcface"
TOKENS_KEY = "arcface_penultimate"

ArcFaceLayer = Literal["last", "penultimate", "both"]


def _expected_files() -> str:
    return "; ".join(f"{name}: {rec} + {det}" for name, (rec, det) in KNOWN_PACKS.items())


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "consisid_lab" / "onnx"


def penultimate_tensor(model) -> str:
    """Name of the spatial map that the embedding head flattens, found by walking back from the first output.

    The walk follows the single data input of each node (the other inputs are weights) until a Flatten/Reshape;
    that node's data input is the map. Raises ``ValueError`` when the graph has no such head (e.g. global pooling).
    """
    graph = model.graph
    # Weights: initializers, Constant outputs, and anything computed from weights alone (e.g. a transposed matrix).
    weights = {t.name for t in graph.initializer}
    for n in graph.node:  # ONNX nodes are topologically sorted
        if n.op_type == "Constant" or all(i in weights for i in n.input if i):
            weights.update(n.output)
    producer = {o: n for n in graph.node for o in n.output}
    name = graph.output[0].name
    path = []
    while True:
        node = producer.get(name)
        if node is None:
            raise ValueError(
                f"no Flatten/Reshape between the graph input and the embedding output {graph.output[0].name!r} "
                f"(walked back through {path}); this ONNX model has no flatten head to take a penultimate map from"
            )
        path.append(node.op_type)
        if node.op_type in FLATTEN_OPS:
            return node.input[0]
        data = [i for i in node.input if i and i not in weights]
        if len(data) != 1:
            raise ValueError(
                f"cannot follow the embedding head back through {node.op_type} node {node.name!r}: it has "
                f"{len(data)} data inputs {data}; expected a chain like Flatten -> Gemm -> BatchNormalization"
            )
        name = data[0]


def penultimate_graph(model_path: str | Path, cache_dir: str | Path | None = None) -> Path:
    """Path of a copy of ``model_path`` whose last output is the penultimate map.

    The copy is written once to ``cache_dir``, named by the hash of the source file.
    """
    import onnx

    model_path = Path(model_path)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    out = cache_dir / f"{model_path.stem}_penultimate_{file_sha256(model_path)[:16]}.onnx"
    if out.is_file():
        return out
    model = onnx.load(str(model_path))
    name = penultimate_tensor(model)
    # Shape inference tells the rank where the exporter recorded shapes; a non-4-D map is a wrong head.
    inferred = onnx.shape_inference.infer_shapes(model)
    for vi in inferred.graph.value_info:
        if vi.name == name and vi.type.tensor_type.HasField("shape"):
            rank = len(vi.type.tensor_type.shape.dim)
            if rank != 4:
                raise ValueError(f"the flatten head of {model_path} reads a rank-{rank} tensor {name!r}, not a map")
    model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    onnx.save(model, str(tmp))
    tmp.replace(out)  # atomic: a concurrent reader never sees half a file
    logger.info("wrote ArcFace graph with penultimate output %r to %s", name, out)
    return out


class InsightFaceArcFace:
    """ArcFace identity features from an insightface model directory.

    Args:
        model_dir: directory with the ONNX files (e.g. ``.../models/antelopev2``).
        det_name / rec_name: file names inside ``model_dir``; by default the known pack names, else the single
            recognition / detection model found by insightface's router.
        providers: onnxruntime execution providers.
        layer: ``last`` (512-d embedding) or ``penultimate`` (adds the spatial map as tokens).
        cache_dir: where the penultimate graph is cached (default ``~/.cache/consisid_lab/onnx``).
        face_policy: which face to use when the encoder has to detect faces itself.
        mesh_agreement: without a detector in the pack, MediaPipe's detections count only where the face mesh
            confirms them (see :data:`~consisid_lab.faces.analysis.MESH_AGREEMENT`); ``None``: no check.
    """

    def __init__(
        self,
        model_dir: str | Path,
        det_name: str | None = None,
        rec_name: str | None = None,
        providers: list[str] | tuple[str, ...] = ("CPUExecutionProvider",),
        layer: ArcFaceLayer = "last",
        cache_dir: str | Path | None = None,
        face_policy: FacePolicy = "largest",
        mesh_agreement: float | None = None,
    ) -> None:
        self._embedding, self._map = arcface_outputs(layer)
        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise FileNotFoundError(
                f"ArcFace model directory {self.model_dir} does not exist; expected a folder with {_expected_files()}"
            )
        self.providers = list(providers)
        self.layer = layer
        self.face_policy = face_policy
        self.mesh_agreement = mesh_agreement
        self.rec_path, self.det_path = self._resolve(rec_name, det_name)

        from insightface.model_zoo import get_model

        self.rec = get_model(str(self.rec_path), providers=self.providers)
        self.det = None
        if self.det_path is not None:
            self.det = get_model(str(self.det_path), providers=self.providers)
            # insightface's ctx_id < 0 forces the CPU provider; >= 0 keeps the providers given here
            cpu_only = all(p == "CPUExecutionProvider" for p in self.providers)
            self.det.prepare(ctx_id=-1 if cpu_only else 0, input_size=DETECTOR_INPUT_SIZE)
        self._analyzer: FaceAnalyzer | None = None
        self._session = None
        if self._map:
            import onnxruntime as ort

            path = penultimate_graph(self.rec_path, cache_dir)
            self._session = ort.InferenceSession(str(path), providers=self.providers)
            outputs = self._session.get_outputs()
            self.map_name = outputs[-1].name  # penultimate_graph appends the map after the embedding
            self._input_name = self._session.get_inputs()[0].name
            self._output_names = [outputs[0].name, self.map_name]
        # Declared output sizes (the local-encoder contract), read off one forward pass of a blank face.
        probe = self.features(np.zeros((1, ARCFACE_SIZE, ARCFACE_SIZE, 3), np.uint8))
        self.vector_dims = {k: v.shape[-1] for k, v in probe.vectors.items()}
        self.token_dims = {k: v.shape[-1] for k, v in probe.tokens.items()}

    # --- model files ------------------------------------------------------------------------------------------
    def _named(self, name: str, what: str) -> Path:
        path = self.model_dir / name
        if not path.is_file():
            raise FileNotFoundError(
                f"{what} model {name} not found in {self.model_dir}; expected files: {_expected_files()}"
            )
        return path

    def _resolve(self, rec_name: str | None, det_name: str | None) -> tuple[Path, Path | None]:
        rec = self._named(rec_name, "recognition") if rec_name else None
        det = self._named(det_name, "detection") if det_name else None
        for pack_rec, pack_det in KNOWN_PACKS.values():
            if rec is None and (self.model_dir / pack_rec).is_file():
                rec = self.model_dir / pack_rec
            if det is None and rec is not None and rec.name == pack_rec and (self.model_dir / pack_det).is_file():
                det = self.model_dir / pack_det
        if rec is None or det is None:
            recs, dets = self._scan(skip={p for p in (rec, det) if p is not None})
            rec = rec or self._single(recs, "recognition", "rec_name")
            det = det or self._single(dets, "detection", "det_name")
        if rec is None:
            raise FileNotFoundError(
                f"no ArcFace recognition model (.onnx with a 112x112 input) in {self.model_dir}; expected files: "
                f"{_expected_files()}"
            )
        if det is None:
            logger.info("no face detector in %s: faces are located with MediaPipe", self.model_dir)
        return rec, det

    def _scan(self, skip: set[Path]) -> tuple[list[Path], list[Path]]:
        """Classify the ONNX files with insightface's router (what its FaceAnalysis does): recognition, detection."""
        from insightface.model_zoo import get_model

        recs, dets = [], []
        for path in sorted(self.model_dir.glob("*.onnx")):
            if path in skip:
                continue
            model = get_model(str(path), providers=self.providers)
            if model is None:
                continue
            if model.taskname == "recognition" and tuple(model.input_size) == (ARCFACE_SIZE, ARCFACE_SIZE):
                recs.append(path)
            elif model.taskname == "detection":
                dets.append(path)
        return recs, dets

    def _single(self, found: list[Path], kind: str, arg: str) -> Path | None:
        if len(found) > 1:
            raise ValueError(
                f"{len(found)} {kind} models in {self.model_dir}: {[p.name for p in found]}; pick one with {arg}="
            )
        return found[0] if found else None

    # --- faces -------------------------------------------------------------------------------------------------
    def detect(self, image: np.ndarray, source: str | Path | None = None) -> FaceInfo:
        """The policy's face in an RGB image: insightface's detector when the pack has one, else MediaPipe."""
        image = to_rgb_uint8(image)
        if self.det is None:
            if self._analyzer is None:
                self._analyzer = FaceAnalyzer(mesh_agreement=self.mesh_agreement)
            return self._analyzer.analyze(image, self.face_policy, source=source)
        bboxes, kpss = self.det.detect(np.ascontiguousarray(image[..., ::-1]), max_num=0)  # insightface wants BGR
        faces = [
            FaceInfo(box=b[:4], score=float(b[4]), mesh=None, kps=k.astype(np.float32), image_size=image.shape[:2])
            for b, k in zip(bboxes, kpss)
        ]
        return select_face(faces, self.face_policy, source=describe(image, source))

    # --- embeddings --------------------------------------------------------------------------------------------
    def embed_aligned(self, aligned: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Embeddings ``(B, 512)`` and, for ``penultimate``, the map ``(B, C, h, w)`` of aligned RGB faces.

        ``aligned``: ``(B, 112, 112, 3)`` RGB uint8, already on the ArcFace template.
        """
        aligned = np.asarray(aligned)
        if aligned.ndim != 4 or aligned.shape[1:] != (ARCFACE_SIZE, ARCFACE_SIZE, 3):
            raise ValueError(f"aligned faces must be (B, 112, 112, 3) RGB, got shape {aligned.shape}")
        bgr = [np.ascontiguousarray(a[..., ::-1]) for a in aligned]  # insightface's get_feat swaps BGR -> RGB
        if self._session is None:
            return self.rec.get_feat(bgr).astype(np.float32), None
        # Same preprocessing as ArcFaceONNX.get_feat (its mean/std come from inspecting the graph).
        blob = (aligned.astype(np.float32) - self.rec.input_mean) / self.rec.input_std
        blob = np.ascontiguousarray(blob.transpose(0, 3, 1, 2))  # (B, 3, 112, 112), RGB
        emb, fmap = self._session.run(self._output_names, {self._input_name: blob})
        if fmap.ndim != 4:
            raise ValueError(f"penultimate tensor {self.map_name!r} has shape {fmap.shape}, expected (B, C, h, w)")
        return emb.astype(np.float32), fmap.astype(np.float32)

    def features(self, aligned: np.ndarray) -> IdentityFeatures:
        emb, fmap = self.embed_aligned(aligned)
        feats = IdentityFeatures(vectors={VECTOR_KEY: torch.from_numpy(emb)} if self._embedding else {})
        if fmap is not None:
            b, c, h, w = fmap.shape
            feats.tokens[TOKENS_KEY] = torch.from_numpy(fmap.reshape(b, c, h * w).transpose(0, 2, 1).copy())
        return feats

    def __call__(self, faces: torch.Tensor, kps: torch.Tensor | None = None) -> IdentityFeatures:
        """Features of face images ``(B, 3, H, W)`` in [-1, 1] with their ArcFace keypoints ``(B, 5, 2)``.

        Without ``kps`` each image is searched for a face (:class:`NoFaceError` when there is none).
        Returns the vector ``arcface`` ``(B, 512)`` (``last``, ``both``) and the tokens ``arcface_penultimate``
        ``(B, h*w, C)`` (``penultimate``, ``both``).
        """
        images = [to_rgb_uint8(f) for f in faces]
        if kps is None:
            points = [self.detect(im, source=f"face image {i} of the batch").kps for i, im in enumerate(images)]
        else:
            points = list(kps.detach().cpu().float().numpy())
        aligned = np.stack([align_face(im, p) for im, p in zip(images, points)])  # (B, 112, 112, 3)
        return self.features(aligned).to(device=faces.device)

    def encode_image(self, image: np.ndarray | str | Path) -> IdentityFeatures:
        """Features of the policy's face in a photo (an RGB array or a path); one row."""
        from consisid_lab.faces.analysis import load_image

        source = image if isinstance(image, (str, Path)) else None
        image = load_image(image) if source is not None else to_rgb_uint8(image)
        face = self.detect(image, source=source)
        return self.features(align_face(image, face.kps)[None])
