"""Shared fixtures: Hydra composition of the real configs with tiny sizes and outputs under tmp_path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# Sizes that keep a full compose -> fit -> test cycle to seconds on one CPU core.
TINY_OVERRIDES = [
    "debug=fast",
    "logger=csv",
    "standins_recipe=tiny",
    "data.num_frames=5",
    "data.height=32",
    "data.width=32",
    "model.backbone.config.num_layers=2",
    "model.backbone.config.num_attention_heads=2",
    "model.backbone.config.attention_head_dim=16",
    "model.backbone.config.sample_frames=5",
    "model.backbone.config.sample_height=8",
    "model.backbone.config.sample_width=8",
    "model.text_encoder.dim=32",
    "model.text_encoder.max_length=16",
    "model.sampling.num_steps=2",
    "~callbacks.progress",
    # Spectra and scalars without their figures: drawing them was most of a tiny run's time (tests of the
    # figures build the callback themselves, tests/test_frequency_callback.py).
    "callbacks.frequency.figures=false",
]


@pytest.fixture(scope="session")
def standin_cache(tmp_path_factory) -> Path:
    """One stand-in cache (tiny recipe) for the whole session, never the user's ~/.cache."""
    path = tmp_path_factory.mktemp("consisid_cache")
    os.environ["CONSISID_LAB_CACHE"] = str(path)
    return path


def tiny_cogvideox_vae(latent_channels: int, height: int, width: int):
    """A randomly initialised CogVideoX VAE of 8-channel blocks (call under a fixed seed for fixed weights)."""
    from diffusers import AutoencoderKLCogVideoX

    return AutoencoderKLCogVideoX(
        down_block_types=("CogVideoXDownBlock3D",) * 3,
        up_block_types=("CogVideoXUpBlock3D",) * 3,
        block_out_channels=(8, 8, 8),
        latent_channels=latent_channels,
        layers_per_block=1,
        norm_num_groups=4,
        temporal_compression_ratio=4,
        sample_height=height,
        sample_width=width,
        scaling_factor=0.7,
    )


def compose_train(overrides: list[str], output_dir: Path, cache_dir: Path, tiny: bool = True):
    """Compose `conf/train.yaml` as the CLI would, with Hydra's runtime config set (output dir = output_dir)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[*(TINY_OVERRIDES if tiny else []), *overrides, f"paths.cache_dir={cache_dir}"],
            return_hydra_config=True,
        )
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    output_dir.mkdir(parents=True, exist_ok=True)
    return cfg


@pytest.fixture
def train_cfg(tmp_path, standin_cache):
    def make(*overrides: str, tiny: bool = True):
        return compose_train(list(overrides), tmp_path / "run", standin_cache, tiny=tiny)

    return make


@pytest.fixture(autouse=True)
def _one_thread():
    # Tests share 2 cores; deterministic single-thread math keeps timings and resumes stable.
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
