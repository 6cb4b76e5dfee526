"""insightface ArcFace from a model directory, checked against a tiny ArcFace-shaped ONNX graph built here."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx")
pytest.importorskip("insightface")

from _released_face_models import export_arcface_onnx  # noqa: E402

from consisid_lab.faces.analysis import align_face  # noqa: E402
from consisid_lab.faces.arcface import InsightFaceArcFace, penultimate_tensor  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*estimate.*:FutureWarning")  # insightface's call into skimage


class TinyArcFace(nn.Module):
    """Strided convs -> BN -> (B, C, 7, 7) -> flatten -> linear 512 -> BN1d, like insightface's iresnet."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, c, 3, 2, 1), nn.BatchNorm2d(c), nn.PReLU(c),  # 56
            nn.Conv2d(c, c, 3, 2, 1), nn.BatchNorm2d(c), nn.PReLU(c),  # 28
            nn.Conv2d(c, c, 3, 2, 1), nn.BatchNorm2d(c), nn.PReLU(c),  # 14
            nn.Conv2d(c, c, 3, 2, 1), nn.BatchNorm2d(c),  # 7
        )  # fmt: skip
        self.fc = nn.Linear(c * 7 * 7, 512)
        self.features = nn.BatchNorm1d(512)

    def forward_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)  # (B, C, 7, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.fc(torch.flatten(self.forward_map(x), 1)))


def _random_bn_stats(module: nn.Module, gen: torch.Generator) -> None:
    for m in module.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)


@pytest.fixture(scope="module")
def tiny():
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = TinyArcFace()
    with torch.no_grad():
        _random_bn_stats(net, gen)
    return net.eval()


@pytest.fixture(scope="module")
def model_dir(tiny, tmp_path_factory):
    d = tmp_path_factory.mktemp("antelopev2")
    export_arcface_onnx(tiny, d / "glintr100.onnx")
    return d


def _reference(net: nn.Module, aligned: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The torch module on insightface's preprocessing: RGB, (x - 127.5) / 127.5."""
    x = torch.from_numpy(aligned).float().permute(0, 3, 1, 2).sub(127.5).div(127.5)
    with torch.no_grad():
        return net(x).numpy(), net.forward_map(x).numpy()


def _aligned_batch(n: int = 2) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(n, 112, 112, 3), dtype=np.uint8)


def test_last_and_penultimate_match_the_torch_module(tiny, model_dir, tmp_path):
    """last: the embedding alone; penultimate: the spatial map instead; both: the two."""
    aligned = _aligned_batch()
    ref_emb, ref_map = _reference(tiny, aligned)

    last = InsightFaceArcFace(model_dir, layer="last", cache_dir=tmp_path / "cache")
    feats = last.features(aligned)
    assert set(feats.vectors) == {"arcface"} and not feats.tokens
    assert feats.vectors["arcface"].shape == (2, 512)
    assert last.vector_dims == {"arcface": 512} and last.token_dims == {}
    np.testing.assert_allclose(feats.vectors["arcface"].numpy(), ref_emb, atol=1e-4, rtol=1e-4)

    pen = InsightFaceArcFace(model_dir, layer="penultimate", cache_dir=tmp_path / "cache")
    feats = pen.features(aligned)
    tokens = feats.tokens["arcface_penultimate"]
    assert tokens.shape == (2, 49, 16) and not feats.vectors  # the map instead of the embedding
    assert pen.token_dims == {"arcface_penultimate": 16} and pen.vector_dims == {}
    both = InsightFaceArcFace(model_dir, layer="both", cache_dir=tmp_path / "cache")
    feats = both.features(aligned)
    assert both.vector_dims == {"arcface": 512} and both.token_dims == {"arcface_penultimate": 16}
    np.testing.assert_allclose(feats.vectors["arcface"].numpy(), ref_emb, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(feats.tokens["arcface_penultimate"].numpy(), tokens.numpy())
    with pytest.raises(ValueError, match=r"arcface_layer must be one of \['last', 'penultimate', 'both'\], got 'map'"):
        InsightFaceArcFace(model_dir, layer="map", cache_dir=tmp_path / "cache")
    # tokens are the map flattened row-major over (h, w): token k is pixel (k // 7, k % 7)
    np.testing.assert_allclose(tokens.numpy(), ref_map.reshape(2, 16, 49).transpose(0, 2, 1), atol=1e-4, rtol=1e-4)
    assert len(list((tmp_path / "cache").glob("*.onnx"))) == 1

    # the cached graph is reused, not rebuilt
    again = InsightFaceArcFace(model_dir, layer="penultimate", cache_dir=tmp_path / "cache")
    np.testing.assert_allclose(again.features(aligned).tokens["arcface_penultimate"].numpy(), tokens.numpy())


def test_renamed_graph_still_finds_the_map(tiny, tmp_path):
    """Node and tensor names differ between exports; the map is found by structure."""
    d = tmp_path / "pack"
    d.mkdir()
    export_arcface_onnx(tiny, tmp_path / "orig.onnx")
    model = onnx.load(str(tmp_path / "orig.onnx"))
    keep = {i.name for i in model.graph.input} | {o.name for o in model.graph.output}
    rename = {}
    for k, node in enumerate(model.graph.node):
        node.name = f"n{k:03d}_{node.op_type.lower()}"
        for j, out in enumerate(node.output):
            if out not in keep:
                rename[out] = f"t{k}_{j}"
    for node in model.graph.node:
        node.input[:] = [rename.get(i, i) for i in node.input]
        node.output[:] = [rename.get(o, o) for o in node.output]
    onnx.save(model, str(d / "my_recognizer.onnx"))  # not a known pack name: found by insightface's router
    assert penultimate_tensor(model).startswith("t")

    aligned = _aligned_batch(1)
    ref_emb, ref_map = _reference(tiny, aligned)
    enc = InsightFaceArcFace(d, layer="both", cache_dir=tmp_path / "cache")
    feats = enc.features(aligned)
    np.testing.assert_allclose(feats.vectors["arcface"].numpy(), ref_emb, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(
        feats.tokens["arcface_penultimate"].numpy(), ref_map.reshape(1, 16, 49).transpose(0, 2, 1), atol=1e-4
    )


def test_head_with_derived_weights_is_followed():
    """MatMul against a transposed weight (a node of weights only) and a bias Add: still one data path."""
    helper = onnx.helper
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 112, 112])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])
    inits = [
        onnx.numpy_helper.from_array(np.zeros((2, 3, 16, 16), np.float32), "k"),
        onnx.numpy_helper.from_array(np.zeros((4, 2 * 7 * 7), np.float32), "w"),
        onnx.numpy_helper.from_array(np.zeros(4, np.float32), "b"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "k"], ["fmap"], strides=[16, 16]),
        helper.make_node("Flatten", ["fmap"], ["flat"]),
        helper.make_node("Transpose", ["w"], ["wt"]),
        helper.make_node("MatMul", ["flat", "wt"], ["mm"]),
        helper.make_node("Add", ["mm", "b"], ["y"]),
    ]
    model = helper.make_model(helper.make_graph(nodes, "head", [x], [y], initializer=inits))
    assert penultimate_tensor(model) == "fmap"


def test_graph_without_flatten_head_is_rejected():
    helper = onnx.helper
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 112, 112])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3])
    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["x"], ["p"]),
            helper.make_node("Squeeze", ["p", "axes"], ["y"]),
        ],
        "pooled",
        [x],
        [y],
        initializer=[onnx.numpy_helper.from_array(np.array([2, 3], dtype=np.int64), "axes")],
    )
    with pytest.raises(ValueError, match="no Flatten/Reshape"):
        penultimate_tensor(helper.make_model(graph))


def test_call_aligns_with_keypoints_and_detects_without_them(tiny, model_dir, tmp_path):
    skimage_data = pytest.importorskip("skimage.data")
    image = skimage_data.astronaut()  # (512, 512, 3) RGB
    enc = InsightFaceArcFace(model_dir, layer="last", cache_dir=tmp_path)  # no detector in the dir: MediaPipe
    face = enc.detect(image)
    x = torch.from_numpy(image).permute(2, 0, 1).float().div(127.5).sub(1)[None]  # (1, 3, H, W) in [-1, 1]

    with_kps = enc(x, torch.from_numpy(face.kps)[None])
    ref_emb, _ = _reference(tiny, align_face(image, face.kps)[None])
    np.testing.assert_allclose(with_kps.vectors["arcface"].numpy(), ref_emb, atol=1e-3, rtol=1e-3)

    detected = enc(x)  # finds the same face itself
    torch.testing.assert_close(detected.vectors["arcface"], with_kps.vectors["arcface"], atol=1e-3, rtol=1e-3)
    # a different face position gives a different embedding (the alignment matters)
    shifted = enc(x, torch.from_numpy(face.kps + 20.0)[None])
    assert not torch.allclose(shifted.vectors["arcface"], with_kps.vectors["arcface"], atol=1e-2)


DET = 640
STRIDES = (8, 16, 32)
# Two faces for a fake SCRFD detector, in the 640x640 detector frame: (anchor x, anchor y) on the stride-32 grid,
# box half-size in strides. A large one near the top-left corner, a small one at the centre.
FAKE_FACES = {"large": (5, 5, 3.0), "small": (10, 10, 1.0)}


def _fake_scrfd(path) -> dict[str, np.ndarray]:
    """An ONNX graph with SCRFD's 9 outputs (scores, boxes, keypoints per stride, 2 anchors) that reports two faces.

    Returns the expected keypoints per face, in detector pixels.
    """
    helper = onnx.helper
    nodes, outputs, inits, expected = [], [], [], {}
    x = helper.make_tensor_value_info("input.1", onnx.TensorProto.FLOAT, [1, 3, DET, DET])
    # every output depends on the image (x * 0 summed), as a real detector's would
    nodes.append(helper.make_node("ReduceSum", ["input.1"], ["sum"], keepdims=0))
    nodes.append(helper.make_node("Mul", ["sum", "zero"], ["dep"]))
    inits.append(onnx.numpy_helper.from_array(np.zeros((), np.float32), "zero"))
    tensors = {}
    for s in STRIDES:
        n = (DET // s) ** 2 * 2
        scores, boxes, kps = np.zeros((n, 1), np.float32), np.zeros((n, 4), np.float32), np.zeros((n, 10), np.float32)
        if s == 32:
            w = DET // s
            for name, (ax, ay, half) in FAKE_FACES.items():
                i = (ay * w + ax) * 2
                scores[i] = 0.9
                boxes[i] = half
                offsets = np.array([[-0.4, -0.3], [0.4, -0.3], [0, 0.1], [-0.3, 0.5], [0.3, 0.5]]) * half
                kps[i] = offsets.reshape(-1)
                expected[name] = np.array([ax * s, ay * s]) + offsets * s
        tensors.update({f"score_{s}": scores, f"bbox_{s}": boxes, f"kps_{s}": kps})
    for kind in ("score", "bbox", "kps"):
        for s in STRIDES:
            name = f"{kind}_{s}"
            inits.append(onnx.numpy_helper.from_array(tensors[name], f"{name}_const"))
            nodes.append(helper.make_node("Add", [f"{name}_const", "dep"], [name]))
            outputs.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, list(tensors[name].shape)))
    graph = helper.make_graph(nodes, "fake_scrfd", [x], outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return expected


def test_insightface_detector_and_face_policy(tiny, tmp_path):
    d = tmp_path / "antelopev2"
    d.mkdir()
    export_arcface_onnx(tiny, d / "glintr100.onnx")
    expected = _fake_scrfd(d / "scrfd_10g_bnkps.onnx")
    image = np.full((DET, DET, 3), 128, np.uint8)  # the fake detector ignores pixels

    largest = InsightFaceArcFace(d, face_policy="largest", cache_dir=tmp_path)
    assert largest.det is not None and largest.det_path.name == "scrfd_10g_bnkps.onnx"
    np.testing.assert_allclose(largest.detect(image).kps, expected["large"], atol=0.5)
    center = InsightFaceArcFace(d, face_policy="center", cache_dir=tmp_path)
    np.testing.assert_allclose(center.detect(image).kps, expected["small"], atol=0.5)
    # the embedding is that of the chosen face
    feats = center.encode_image(image)
    ref_emb, _ = _reference(tiny, align_face(image, expected["small"])[None])
    np.testing.assert_allclose(feats.vectors["arcface"].numpy(), ref_emb, atol=1e-3, rtol=1e-3)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="glintr100.onnx"):
        InsightFaceArcFace(tmp_path)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope"))):
        InsightFaceArcFace(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="scrfd_10g_bnkps.onnx.*not found"):
        InsightFaceArcFace(tmp_path, det_name="scrfd_10g_bnkps.onnx")
    with pytest.raises(ValueError, match="layer"):
        InsightFaceArcFace(tmp_path, layer="middle")


def test_ambiguous_directory_asks_for_a_name(model_dir, tmp_path):
    import shutil

    d = tmp_path / "two"
    d.mkdir()
    for name in ("a.onnx", "b.onnx"):
        shutil.copy(model_dir / "glintr100.onnx", d / name)
    with pytest.raises(ValueError, match="2 recognition models.*rec_name="):
        InsightFaceArcFace(d, cache_dir=tmp_path)
    enc = InsightFaceArcFace(d, rec_name="b.onnx", cache_dir=tmp_path)
    assert enc.rec_path.name == "b.onnx" and enc.det is None
