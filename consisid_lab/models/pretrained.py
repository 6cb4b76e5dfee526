"""Pretrained initialisation: real weights into the training composition, strictly, shard by shard.

- ``model.init_from=DIR``: a published ConsisID directory (diffusers layout). Its ``transformer_ema/`` (preferred
  when present, as the release ships it) or ``transformer/`` weights replace the fuser, backbone and injector.
- ``model.backbone.pretrained=DIR``: a CogVideoX diffusers transformer (CogVideoX-5B-I2V: its root or its
  ``transformer/`` folder) for the backbone alone; the identity modules stay new.

Everything is checked before any tensor is read: the folder's ``config.json`` against our composition (every
mismatching component listed), then every weight name and shape in the safetensors headers against the model's
(missing, unexpected and mis-shaped weights listed). The model is built on the meta device and each shard's
tensors are assigned into it as they are read, so the weights exist once in memory.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from consisid_lab.models.published import CompositionMismatchError, composition_mismatches, materialise_buffers

log = logging.getLogger(__name__)

WEIGHTS = "diffusion_pytorch_model.safetensors"
INDEX = WEIGHTS + ".index.json"
# Config values that do not shape the weights nor change the computation's layout (ours win).
_FREE_KEYS = ("local_face_scale", "dropout")
_LISTED = 8  # weight names shown per kind of problem


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files of a diffusers model folder (one file, or the shards its index names), all present."""
    index, single = folder / INDEX, folder / WEIGHTS
    if index.is_file():
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise FileNotFoundError(f"{index} has no weight_map; re-save the model with diffusers' save_pretrained")
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{index} names {len(shards)} shards, but {len(missing)} are missing: "
                + ", ".join(str(folder / s) for s in missing)
                + "; download the whole folder again"
            )
        return [folder / s for s in shards]
    if single.is_file():
        return [single]
    bins = sorted(p.name for p in folder.glob("*.bin"))
    raise FileNotFoundError(
        f"no weights in {folder}: expected {single} or the sharded index {index}"
        + (f" (found {bins}: convert them with diffusers' save_pretrained(safe_serialization=True))" if bins else "")
    )


def header_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape, from the safetensors headers only (no tensor is read)."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


def check_weights(
    where: Path, expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]], what: str
) -> None:
    """``CompositionMismatchError`` listing missing, unexpected and mis-shaped weights (checkpoint names)."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = sorted(k for k in set(expected) & set(found) if tuple(expected[k]) != tuple(found[k]))
    if not (missing or unexpected or shapes):
        return
    lines = []
    if missing:
        lines.append(f"{len(missing)} missing: {missing[:_LISTED]}")
    if unexpected:
        lines.append(f"{len(unexpected)} unexpected: {unexpected[:_LISTED]}")
    if shapes:
        lines.append(
            f"{len(shapes)} of another shape: "
            + ", ".join(f"{k} {tuple(found[k])} (ours {tuple(expected[k])})" for k in shapes[:_LISTED])
        )
    raise CompositionMismatchError(f"{where} does not fit {what}; weights:\n  " + "\n  ".join(lines))


def load_into(
    module: nn.Module,
    files: list[Path],
    to_ours: Callable[[str], str],
    dtypes: Mapping[str, torch.dtype],
) -> None:
    """Read ``files`` shard by shard into the meta-built ``module`` (``assign``: the read tensors become its
    weights). ``dtypes``: the dtype of each parameter (buffers keep the stored dtype, as diffusers saves them)."""
    from safetensors import safe_open

    for path in files:
        state: dict[str, Tensor] = {}
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                name = to_ours(key)
                value = f.get_tensor(key)
                state[name] = value.to(dtypes[name]) if name in dtypes else value
        # Per shard the other shards' weights are missing by design; names and shapes were checked as a whole
        # before anything was read, and the check below proves every weight arrived.
        result = module.load_state_dict(state, strict=False, assign=True)
        assert not result.unexpected_keys, result.unexpected_keys
        del state
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    persistent = set(module.state_dict())
    if any(n in persistent for n in left):
        raise RuntimeError(f"weights not loaded: {[n for n in left if n in persistent][:_LISTED]}")


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no {path}: {folder} is not a diffusers model folder")
    with open(path) as f:
        return json.load(f)


def published_transformer_folder(root: str | Path) -> Path:
    """``root/transformer_ema`` when present (the release's EMA weights), else ``root/transformer``."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"model.init_from={root} does not exist; pass a published ConsisID directory")
    for sub in ("transformer_ema", "transformer"):
        if (root / sub / "config.json").is_file():
            return root / sub
    raise FileNotFoundError(
        f"model.init_from={root} has neither transformer_ema/config.json nor transformer/config.json; pass a "
        "published ConsisID directory (diffusers layout, e.g. BestWishYsh/ConsisID-preview)"
    )


def load_published_transformer(denoiser: nn.Module, root: str | Path) -> Path:
    """A published ConsisID transformer into ``denoiser``'s fuser, backbone and injector (built on meta)."""
    from consisid_lab.models.consisid import NotExpressibleError, consisid_config, diffusers_to_ours, ours_to_diffusers

    folder = published_transformer_folder(root)
    config = _read_config(folder)
    try:
        ours = consisid_config(denoiser)
    except NotExpressibleError as err:
        raise NotExpressibleError(
            f"model.init_from={root} holds a ConsisID transformer, but this composition is not ConsisID's: {err}"
        ) from None
    files = safetensors_files(folder)
    shapes = header_shapes(files)
    expected_cfg = {k: v for k, v in ours.items() if k not in _FREE_KEYS}
    problems = composition_mismatches(config, shapes, expected_cfg)
    if problems:
        raise CompositionMismatchError(
            f"model.init_from: {folder} holds a model of another composition than this config's; mismatched "
            "components:\n  " + "\n  ".join(problems)
        )
    state = denoiser.transformer_state_dict()
    check_weights(folder, {ours_to_diffusers(k): tuple(v.shape) for k, v in state.items()}, shapes, "this config")
    params = dict(denoiser.named_parameters())
    dtypes = {k: params[k].dtype for k in state if k in params}
    load_into(denoiser, files, diffusers_to_ours, dtypes)
    materialise_buffers(denoiser.backbone.transformer, denoiser.backbone.transformer.config)
    log.info(
        "initialised the fuser, backbone and injector from %s (%d weights in %d files)", folder, len(state), len(files)
    )
    return folder


def cogvideox_transformer_folder(path: str | Path) -> Path:
    """A CogVideoX checkpoint root (with ``transformer/``) or the transformer folder itself."""
    path = Path(path).expanduser()
    if (path / "transformer" / "config.json").is_file():
        return path / "transformer"
    if (path / "config.json").is_file():
        return path
    raise FileNotFoundError(
        f"model.backbone.pretrained={path} has no transformer/config.json nor config.json; pass a CogVideoX "
        "diffusers checkpoint (e.g. THUDM/CogVideoX-5b-I2V) or its transformer folder"
    )


def load_cogvideox_backbone(transformer: nn.Module, path: str | Path) -> Path:
    """A CogVideoX diffusers transformer into the meta-built ``transformer`` (our backbone's), strictly."""
    folder = cogvideox_transformer_folder(path)
    config = _read_config(folder)
    ours = dict(transformer.config)
    structural = [k for k in ours if not k.startswith("_") and k not in _FREE_KEYS]
    problems = [
        f"{k}: checkpoint has {config[k]!r}, this config has {ours[k]!r}"
        for k in structural
        if k in config and config[k] != ours[k]
    ]
    if problems:
        raise CompositionMismatchError(
            f"model.backbone.pretrained: {folder} holds another backbone than this config's; mismatched "
            "components:\n  " + "\n  ".join(problems)
        )
    files = safetensors_files(folder)
    shapes = header_shapes(files)
    state = transformer.state_dict()
    check_weights(folder, {k: tuple(v.shape) for k, v in state.items()}, shapes, "this backbone")
    params = dict(transformer.named_parameters())
    load_into(transformer, files, lambda k: k, {k: p.dtype for k, p in params.items()})
    materialise_buffers(transformer, transformer.config)
    log.info("initialised the backbone from %s (%d weights in %d files)", folder, len(state), len(files))
    return folder
