"""Real identity metrics and `consisid_lab.evaluate_videos` on small models the tests build: a tiny ONNX ArcFace pack,
a tiny IR backbone in CurricularFace's layout, a tiny Hugging Face CLIP folder and an Inception file of random
weights in torch-fidelity's layout."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from _real_videos import cat_frames, face_frames
from torch import nn

pytest.importorskip("mediapipe")
pytest.importorskip("insightface")
pytest.importorskip("transformers")

from consisid_lab.data.video_io import write_video  # noqa: E402
from consisid_lab.metrics.real import (  # noqa: E402
    RealMetrics,
    RealMetricsConfig,
    bootstrap_ci,
    check_weights,
    cosine_scores,
)

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore:.*estimate.*:FutureWarning")


class _TinyArcFace(nn.Module):
    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.body = nn.Sequential(*[m for _ in range(4) for m in (nn.Conv2d(c if _ else 3, c, 3, 2, 1), nn.PReLU(c))])
        self.fc = nn.Linear(c * 7 * 7, 512)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.body(x), 1))


def _tiny_ir_state() -> dict[str, torch.Tensor]:
    from consisid_lab.faces.curricularface import IRBackbone

    torch.manual_seed(0)
    net = IRBackbone(units=(1, 1, 1, 1), depths=(8, 16, 24, 32)).eval()
    return net.state_dict()


def _tiny_clip(d: Path) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    d.mkdir(parents=True)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = {
        t: i for i, t in enumerate(["<|startoftext|>", "<|endoftext|>", *letters, *[f"{c}</w>" for c in letters]])
    }
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"))
    img = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=img, tokenizer=tok).save_pretrained(d)
    text = {"vocab_size": len(vocab), "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 2, "max_position_embeddings": 77, "bos_token_id": 0, "eos_token_id": 1,
            "pad_token_id": 1}  # fmt: skip
    vision = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 8}  # fmt: skip
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).save_pretrained(d)
    return d


def _random_inception(path: Path) -> Path:
    """torch-fidelity's FID Inception with random weights: its constructor is run with the weight loading stubbed
    out once, so the file has exactly its keys (no download)."""
    import torch_fidelity.feature_extractor_inceptionv3 as fidelity

    cls = fidelity.FeatureExtractorInceptionV3
    original = cls.load_state_dict
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fidelity, "load_state_dict_from_url", lambda *a, **k: {})
        mp.setattr(cls, "load_state_dict", lambda self, sd, *a, **k: None)
        torch.manual_seed(0)
        net = cls("inception-v3-compat", ["2048"])
    assert cls.load_state_dict is original
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("weights")
    pack = root / "antelopev2"
    pack.mkdir()
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            _TinyArcFace().eval(), torch.zeros(1, 3, 112, 112), str(pack / "glintr100.onnx"), dynamo=False,
            input_names=["data"], output_names=["fc1"], dynamic_axes={"data": {0: "b"}, "fc1": {0: "b"}},
        )  # fmt: skip
    cur = root / "glint360k_curricular_face_r101_backbone.bin"
    torch.save(_tiny_ir_state(), cur)
    return {
        "arcface_dir": pack,
        "curricularface": cur,
        "clip_dir": _tiny_clip(root / "clip"),
        "inception": _random_inception(root / "pt_inception-2015-12-05-6726825d.pth"),
    }


def _cfg(weights, **kw) -> RealMetricsConfig:
    return RealMetricsConfig(**{k: str(v) for k, v in weights.items()}, **{"num_frames": 4, **kw})


def test_a_missing_weight_file_is_named_before_any_video(weights, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"glintr100.onnx not found in .*empty"):
        check_weights(_cfg({**weights, "arcface_dir": tmp_path / "empty"}))
    with pytest.raises(FileNotFoundError, match="set metrics.inception"):
        check_weights(RealMetricsConfig(**{**{k: str(v) for k, v in weights.items()}, "inception": None}))
    with pytest.raises(FileNotFoundError, match=r"config.json not found in .*nowhere"):
        check_weights(_cfg({**weights, "clip_dir": tmp_path / "nowhere"}))
    # the task checks the files first: with a missing file it fails even on a folder whose videos are unreadable
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "a.mp4").write_bytes(b"not a video")
    cfg = _compose(tmp_path, videos, videos, None, {**weights, "curricularface": tmp_path / "missing.bin"})
    from consisid_lab.evaluate_videos import evaluate_videos

    with pytest.raises(FileNotFoundError, match=r"FaceSim-Cur: missing.bin not found in"):
        evaluate_videos(cfg, tmp_path / "run")


def test_same_face_scores_high_and_no_face_scores_none(weights):
    from skimage.data import astronaut

    metrics = RealMetrics.from_config(_cfg(weights))
    ref = astronaut()
    same = metrics.score_video(face_frames(4, size=192), ref, "a person", video="same")
    cat = metrics.score_video(cat_frames(4, size=192), ref, "a cat", video="cat")
    assert same.faces == 4 and same.face_rate == 1.0 and cat.faces == 0 and cat.face_rate == 0.0
    assert cat.facesim_arc is None and cat.facesim_cur is None  # scored only where there is a face
    # every encoder sees one aligned crop: the scores are those of the crops computed here by hand
    crops = np.stack([metrics.aligned_face(f) for f in face_frames(4, size=192)])
    emb = metrics._embed(np.concatenate([metrics.aligned_face(ref)[None], crops]))
    assert same.facesim_arc == pytest.approx(float(cosine_scores(emb["arc"][0], emb["arc"][1:]).mean()), abs=1e-6)
    assert same.facesim_cur == pytest.approx(float(cosine_scores(emb["cur"][0], emb["cur"][1:]).mean()), abs=1e-6)
    # CLIPScore is torchmetrics' on the same frames and prompt
    from torchmetrics.multimodal.clip_score import CLIPScore

    from consisid_lab.metrics.real import _local_clip

    direct = CLIPScore(model_name_or_path=_local_clip(weights["clip_dir"]))
    direct.update(torch.from_numpy(cat_frames(4, size=192)).permute(0, 3, 1, 2), ["a cat"] * 4)
    assert cat.clipscore == pytest.approx(float(direct.compute()), abs=1e-4)
    fid = metrics.fid_value()  # 2 references (one per video) against 4 generated faces, at dataset level
    assert fid is not None and np.isfinite(fid) and fid >= -1e-6


def test_bootstrap_interval_brackets_the_mean():
    ci = bootstrap_ci([0.1, 0.2, 0.3, 0.4, 0.9], num=500, seed=0)
    assert ci is not None and ci[0] < 0.38 < ci[1] and ci == bootstrap_ci([0.1, 0.2, 0.3, 0.4, 0.9], 500, 0)
    assert bootstrap_ci([0.5]) is None


def _compose(tmp_path, videos, references, prompts, weights):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(
            "evaluate_videos",
            overrides=[
                f"videos={videos}", f"references={references}", f"prompts={prompts}" if prompts else "prompts=null",
                f"paths.output_dir={tmp_path / 'run'}", "metrics.num_frames=4", "bootstrap=200",
                *(f"metrics.{k}={v}" for k, v in weights.items()),
            ],
        )  # fmt: skip


def test_evaluate_videos_on_a_folder_of_mp4s(weights, tmp_path):
    from PIL import Image
    from skimage.data import astronaut

    from consisid_lab.evaluate_videos import SUMMARY_FILE, TABLE_FILE, evaluate_videos

    videos, refs = tmp_path / "videos", tmp_path / "refs"
    videos.mkdir()
    refs.mkdir()
    for i in range(3):
        write_video(videos / f"clip{i}.mp4", face_frames(8, size=128, seed=i))
        Image.fromarray(astronaut()).save(refs / f"clip{i}.png")
    write_video(videos / "cat.mp4", cat_frames(8, size=128))
    Image.fromarray(astronaut()).save(refs / "cat.jpg")
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({f"clip{i}": "a person talking" for i in range(3)} | {"cat": "a cat"}))
    summary = evaluate_videos(_compose(tmp_path, videos, refs, prompts, weights), tmp_path / "run")

    written = json.loads((tmp_path / "run" / SUMMARY_FILE).read_text())
    assert written == json.loads(json.dumps(summary)) and summary["videos"] == 4
    m = summary["metrics"]
    assert m["face_rate"]["mean"] == pytest.approx(0.75) and m["facesim_arc"]["n"] == 3
    lo, hi = m["facesim_arc"]["ci95"]
    assert lo <= m["facesim_arc"]["mean"] <= hi
    assert np.isfinite(m["fid"]["value"]) and m["clipscore"]["n"] == 4
    versions = summary["versions"]
    assert versions["files"]["arcface"]["name"] == "glintr100.onnx" and "norm_crop" in versions["alignment"]
    assert versions["detector"].startswith("mediapipe")  # the tiny pack has no SCRFD file
    with (tmp_path / "run" / TABLE_FILE).open() as f:
        rows = {r["video"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"cat.mp4", "clip0.mp4", "clip1.mp4", "clip2.mp4"}
    assert rows["cat.mp4"]["faces"] == "0" and rows["cat.mp4"]["facesim_arc"] == ""
    assert rows["clip0.mp4"]["reference"] == "clip0.png" and float(rows["clip0.mp4"]["facesim_arc"]) > 0
