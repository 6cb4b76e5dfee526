"""``generate`` from a training run, as a newcomer runs it: a run dir, a benchmark identity or a photo, a prompt
with a comma; the checkpoint's own size and settings; the errors that name the fix."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from conftest import CONF, ROOT, compose_train

from consisid_lab.faces.analysis import NoFaceError
from consisid_lab.generate import generate
from consisid_lab.utils.run import resolve_ckpt_path

PROMPT = "a person smiling, blue background"
# What bash hands over for the README's `'prompt="a person smiling, blue background"'`.
PROMPT_OVERRIDE = f'prompt="{PROMPT}"'


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, standin_cache) -> Path:
    """One tiny training run (2 steps, 32 x 32, 5 frames, model.sampling.num_steps=2) shared by this module."""
    from consisid_lab.train import train

    out = tmp_path_factory.mktemp("run")
    train(
        compose_train(["trainer.max_steps=2", "test=false", "callbacks.checkpoint.save_top_k=-1"], out, standin_cache)
    )
    return out


def _compose(*overrides: str):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("generate", overrides=["progress=false", PROMPT_OVERRIDE, *overrides])


def _stored_data(run_dir: Path) -> dict:
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return ckpt["run_config"]["data"]


def _strings(obj) -> list[str]:
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in _strings(v)]
    if isinstance(obj, (list, tuple)):
        return [s for v in obj for s in _strings(v)]
    return []


def test_checkpoints_load_weights_only_and_store_no_cache_path_of_the_machine(run_dir, standin_cache, tmp_path,
                                                                             monkeypatch):  # fmt: skip
    from consisid_lab.eval import load_module
    from consisid_lab.utils.checkpoints import CACHE_MARKER

    path = run_dir / "checkpoints" / "last.ckpt"
    ckpt = torch.load(path, map_location="cpu", weights_only=True)  # no pickled code: plain containers and tensors
    stored = _strings(ckpt["hyper_parameters"]) + _strings(ckpt["run_config"])
    assert not [s for s in stored if str(standin_cache) in s]
    assert ckpt["hyper_parameters"]["local_encoder"]["cache_dir"] == f"{CACHE_MARKER}/standins"
    assert ckpt["run_config"]["paths"]["standin_dir"] == f"{CACHE_MARKER}/standins"
    # Loading resolves the marker to the loading machine's cache (here: another folder, holding a copy).
    import shutil

    other = tmp_path / "other_machine_cache"
    shutil.copytree(standin_cache / "standins", other / "standins")
    monkeypatch.setenv("CONSISID_LAB_CACHE", str(other))
    module = load_module(str(path))
    assert module.hparams["local_encoder"]["cache_dir"] == str(other / "standins")
    assert module.run_config["paths"]["cache_dir"] == str(other)


def _frames(path: Path) -> np.ndarray:
    return iio.imread(path, plugin="pyav")  # (F, H, W, 3)


def test_generate_from_a_run_dir_with_a_benchmark_identity(run_dir, tmp_path, caplog):
    from consisid_lab.data.datamodule import SyntheticDataModule
    from consisid_lab.utils.media import to_uint8_frames

    cfg = _compose(f"ckpt_path={run_dir}", "face=benchmark:0", f"output_dir={tmp_path / 'out'}")
    assert cfg.prompt == PROMPT
    with caplog.at_level(logging.INFO, logger="consisid_lab.generate"):
        files = generate(cfg)
    data = _stored_data(run_dir)
    frames, height, width = data["num_frames"], data["height"], data["width"]
    # The checkpoint's own size, not the published 49 x 480 x 720.
    assert _frames(files["video"]).shape == (frames, height, width, 3)
    assert iio.imread(files["contact_sheet"]).shape == (height, min(8, frames) * width, 3)
    # The reference is test identity 0 of the benchmark, rendered with the run's data config as evaluation sees it.
    dm = SyntheticDataModule(**{k: v for k, v in data.items() if not k.startswith("_")})
    expected = to_uint8_frames(dm.dataset("test")[0]["ref_face"][None])[0]
    assert np.array_equal(iio.imread(files["reference"]), expected)
    messages = [r.getMessage() for r in caplog.records]
    plan = [m for m in messages if m.startswith("generating")]
    assert len(plan) == 1, messages
    assert f"{frames} frames of {height} x {width}, 2 steps" in plan[0] and "benchmark test identity 0" in plan[0]
    assert "for the first of 2 steps" in plan[0] and "about" in plan[0]
    assert any(m.startswith("step 2/2") for m in messages)


def test_a_checkpoint_file_gives_the_same_video_as_its_run_dir(run_dir, tmp_path):
    by_dir = generate(_compose(f"ckpt_path={run_dir}", "face=benchmark:1", f"output_dir={tmp_path / 'dir'}"))
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    by_file = generate(_compose(f"ckpt_path={ckpt}", "face=benchmark:1", f"output_dir={tmp_path / 'file'}"))
    assert np.array_equal(_frames(by_dir["video"]), _frames(by_file["video"]))


def test_overrides_win_over_the_checkpoint_settings(run_dir, tmp_path, caplog):
    cfg = _compose(
        f"ckpt_path={run_dir}", "face=benchmark:0", f"output_dir={tmp_path / 'out'}",
        "num_frames=9", "height=48", "width=64", "num_steps=1",
    )  # fmt: skip
    with caplog.at_level(logging.INFO, logger="consisid_lab.generate"):
        files = generate(cfg)
    assert _frames(files["video"]).shape == (9, 48, 64, 3)
    assert iio.imread(files["reference"]).shape == (48, 64, 3)
    assert any("9 frames of 48 x 64, 1 steps" in r.getMessage() for r in caplog.records)


def test_identity_guidance_from_the_command_line(run_dir, tmp_path, caplog):
    # The run's own guidance (the embedded default guides on the identity), then the caption's from the command line.
    base = [f"ckpt_path={run_dir}", "face=benchmark:0", "num_steps=2", "guidance_scale=3"]
    with caplog.at_level(logging.INFO, logger="consisid_lab.generate"):
        on_id = generate(_compose(*base, f"output_dir={tmp_path / 'id'}"))
    assert any("guidance 3 on identity" in r.getMessage() for r in caplog.records)
    on_text = generate(_compose(*base, "guidance_drops=[text]", f"output_dir={tmp_path / 'text'}"))
    assert not np.array_equal(_frames(on_id["video"]), _frames(on_text["video"]))
    with pytest.raises(ValueError, match=r"guidance_drops=\['face'\].*\[text, identity\]"):
        generate(_compose(*base, "guidance_drops=[face]", f"output_dir={tmp_path / 'bad'}"))


def test_the_resolver_takes_a_run_dir_its_checkpoints_dir_or_a_file(run_dir, tmp_path):
    last = run_dir / "checkpoints" / "last.ckpt"
    assert resolve_ckpt_path(run_dir) == str(last)
    assert resolve_ckpt_path(str(run_dir / "checkpoints")) == str(last)
    step = sorted((run_dir / "checkpoints").glob("step_*.ckpt"))[0]
    assert resolve_ckpt_path(str(step)) == str(step)
    assert resolve_ckpt_path(None) is None and resolve_ckpt_path("null") is None

    with pytest.raises(FileNotFoundError, match=r"without checkpoints/last.ckpt; it holds no .ckpt file"):
        resolve_ckpt_path(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "step_000100.ckpt").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"step_000100.ckpt: pass one of them as ckpt_path=<file>"):
        resolve_ckpt_path(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_ckpt_path(tmp_path / "nowhere")


def test_a_dir_without_a_checkpoint_is_a_clear_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=rf"ckpt_path={empty} is a directory without checkpoints/last.ckpt"):
        generate(_compose(f"ckpt_path={empty}", "face=benchmark:0", f"output_dir={tmp_path / 'out'}"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("height=30", r"StandInCodec needs height to be a positive multiple of 4, got 30; use e.g. 32"),
        ("width=36", r"width=36 is not a multiple of 8 .*e.g. 32 or 40 \(32 x 32 as trained\)"),
    ],
)
def test_a_size_the_codec_cannot_take_names_the_valid_sizes(run_dir, tmp_path, override, pattern):
    with pytest.raises(ValueError, match=pattern):
        generate(_compose(f"ckpt_path={run_dir}", "face=benchmark:0", f"output_dir={tmp_path / 'out'}", override))
    assert not (tmp_path / "out").exists()


def test_a_photo_is_placed_as_the_benchmark_references_are(run_dir, tmp_path):
    from PIL import Image
    from skimage import data as skdata

    from consisid_lab.data.reference_faces import mean_reference_box, synthetic_config

    photo = tmp_path / "astronaut.png"
    Image.fromarray(skdata.astronaut()).save(photo)
    files = generate(_compose(f"ckpt_path={run_dir}", f"face={photo}", f"output_dir={tmp_path / 'out'}"))
    stored = _stored_data(run_dir)
    height, width = stored["height"], stored["width"]
    assert _frames(files["video"]).shape == (stored["num_frames"], height, width, 3)
    ref = iio.imread(files["reference"]).astype(int)  # (H, W, 3)
    assert ref.shape == (height, width, 3)
    # White outside the face oval (as the benchmark's whitened references), the face where theirs is on average.
    face = (255 - ref).sum(-1) > 60
    assert ref[0, 0].tolist() == [255, 255, 255] and ref[-1, -1].tolist() == [255, 255, 255]
    rows, cols = np.flatnonzero(face.any(1)), np.flatnonzero(face.any(0))
    x0, y0, x1, y1 = mean_reference_box(synthetic_config(stored, height, width))
    assert abs((cols[0] + cols[-1]) / 2 - (x0 + x1) / 2) <= 2 and abs((rows[0] + rows[-1]) / 2 - (y0 + y1) / 2) <= 2
    assert 0.6 < (cols[-1] - cols[0] + 1) / (x1 - x0) < 1.4


def test_an_image_without_a_face_names_the_file(run_dir, tmp_path):
    from PIL import Image

    photo = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(photo)
    with pytest.raises(NoFaceError, match="noise.png"):
        generate(_compose(f"ckpt_path={run_dir}", f"face={photo}", f"output_dir={tmp_path / 'out'}"))
    assert not (tmp_path / "out").exists()


def test_benchmark_faces_need_a_synthetic_checkpoint(tmp_path):
    from consisid_lab.data.reference_faces import benchmark_identity, reference_face

    with pytest.raises(ValueError, match="only our training checkpoints"):
        generate(_compose(f"model_path={tmp_path}", "face=benchmark:0", f"output_dir={tmp_path / 'out'}"))
    real = {"_target_": "consisid_lab.data.real_datamodule.RealVideoDataModule"}
    with pytest.raises(ValueError, match="trained on consisid_lab.data.real_datamodule.RealVideoDataModule"):
        reference_face("benchmark:0", real, 32, 32)
    with pytest.raises(ValueError, match="e.g. face=benchmark:0"):
        benchmark_identity("benchmark:first")


def test_the_readme_command_line_runs_and_logs_its_progress(run_dir, tmp_path, standin_cache):
    out = tmp_path / "cli"
    env = {**os.environ, "CONSISID_LAB_CACHE": str(standin_cache)}
    cmd = [
        sys.executable, "-m", "consisid_lab.generate", f"ckpt_path={run_dir}", "face=benchmark:0", PROMPT_OVERRIDE,
        "progress=false", f"hydra.run.dir={out}",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "video.mp4").is_file() and (out / "contact_sheet.png").is_file()
    logged = (out / "generate.log").read_text()
    assert "for the first of 2 steps" in logged and "step 2/2" in logged
