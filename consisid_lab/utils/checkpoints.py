"""Checkpoints that survive interruption: atomic writes, and resuming from the newest file that loads.

Lightning's own save goes through an fsspec transaction whose temporary file lives in the system temp dir; when
that is another file system than the run dir (local /tmp, shared outputs) the final move is a copy, and a kill
or a full disk during it leaves a truncated ``last.ckpt``. ``AtomicCheckpointIO`` writes next to the target and
renames, which is atomic on POSIX file systems, so every ``.ckpt`` in a run dir is complete. It is a
``CheckpointIO`` plugin, so it works whatever ``ModelCheckpoint`` keeps (top-k, last only, every n steps).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

log = logging.getLogger(__name__)

CHECKPOINT_SUFFIX = ".ckpt"


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to a temporary file beside the target, ``fsync``, then ``os.replace`` it into place.

    A kill during saving leaves the previous file of that name intact (plus a hidden ``.*.tmp`` file that no
    resume looks at). Remote URLs (``s3://`` ...) keep Lightning's behaviour.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        if not isinstance(get_filesystem(path), LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(
                f"{type(self).__name__} takes no storage_options for local files, got {storage_options!r}; "
                "drop the argument of Trainer.save_checkpoint"
            )
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(target.parent)


def _fsync_dir(directory: Path) -> None:
    """Persist the rename itself (the directory entry), where the platform allows opening directories."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# Stored configs name the shared cache by this marker, not by the training machine's absolute path; loading
# replaces it by the loading machine's cache (``$CONSISID_LAB_CACHE`` or ``~/.cache/consisid_lab``, as
# conf/paths/default.yaml resolves it). A plain string (no interpolation), so the config stays plain containers.
CACHE_MARKER = "<consisid_lab cache>"


def machine_cache_dir() -> str:
    """This machine's ``paths.cache_dir`` (conf/paths/default.yaml's formula)."""
    env = os.environ.get("CONSISID_LAB_CACHE")
    return env if env else str(Path.home() / ".cache" / "consisid_lab")


def _map_strings(obj: Any, fn: Any) -> Any:
    if isinstance(obj, str):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_strings(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_strings(v, fn) for v in obj)
    return obj


def portable_config(cfg: Any, cache_dir: str | os.PathLike | None) -> Any:
    """``cfg`` (plain containers) with every path under ``cache_dir`` written as ``CACHE_MARKER/relative``, inside
    longer strings too (the recorded overrides, ``paths.cache_dir=...``)."""
    import re

    if not cache_dir:
        return cfg
    root = os.path.normpath(os.fspath(cache_dir))
    pattern = re.compile(re.escape(root) + r"(?=$|/|[^\w.-])")
    return _map_strings(cfg, lambda s: pattern.sub(CACHE_MARKER, s))


def localised_config(cfg: Any, cache_dir: str | os.PathLike | None = None) -> Any:
    """The inverse of :func:`portable_config` on the loading machine (``cache_dir`` default: its own cache)."""
    root = os.fspath(cache_dir) if cache_dir else machine_cache_dir()
    return _map_strings(cfg, lambda s: s.replace(CACHE_MARKER, root))


def load_checkpoint(path: str | os.PathLike, mmap: bool = False) -> dict[str, Any]:
    """A training checkpoint loaded with ``weights_only=True`` (no code runs while unpickling)."""
    return torch.load(path, map_location="cpu", weights_only=True, **({"mmap": True} if mmap else {}))


def load_error(path: Path) -> str | None:
    """``None`` if ``path`` loads as a checkpoint, else why not (the loader's error).

    Memory-mapped, so only the archive's index and pickled metadata are read, not the tensors.
    """
    if path.stat().st_size == 0:
        return "it is empty"
    try:
        try:
            ckpt = load_checkpoint(path, mmap=True)
        except RuntimeError as err:
            if "mmap can only be used" not in str(err):
                raise
            ckpt = load_checkpoint(path)  # the legacy (non-zip) format
    except Exception as err:  # any failure to load is a reason to skip the file
        return f"{type(err).__name__}: {' '.join(str(err).split())}"
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        return f"it holds {type(ckpt).__name__} without a state_dict, not a training checkpoint"
    return None


def checkpoint_files(directory: Path) -> list[Path]:
    """The ``.ckpt`` files of a run dir (its ``checkpoints/`` folder, or the folder itself), newest first."""
    folder = directory / "checkpoints" if (directory / "checkpoints").is_dir() else directory
    files = [p for p in folder.glob(f"*{CHECKPOINT_SUFFIX}") if p.is_file()]
    return sorted(files, key=lambda p: (p.stat().st_mtime_ns, p.name), reverse=True)


def newest_loadable_checkpoint(directory: Path) -> Path:
    """The newest checkpoint of a run dir that loads; each newer one skipped is logged with the reason.

    Raises ``FileNotFoundError`` naming every file and why it was rejected when none loads.
    """
    files = checkpoint_files(directory)
    if not files:
        raise FileNotFoundError(
            f"ckpt_path={directory} is a directory without .ckpt files (looked in {directory / 'checkpoints'}); "
            "pass a .ckpt file or the output directory of a run that saved one"
        )
    skipped: list[str] = []
    for path in files:
        reason = load_error(path)
        if reason is None:
            if skipped:
                log.warning("resuming from %s, the newest checkpoint that loads", path)
            return path
        log.warning("skipping checkpoint %s: it does not load (%s)", path, reason)
        skipped.append(f"{path.name} ({reason})")
    raise FileNotFoundError(
        f"no checkpoint in {files[0].parent} loads: {'; '.join(skipped)}. Pass another run's directory or file"
    )


def resume_checkpoint(path: str | Path | None) -> str | None:
    """What ``train`` resumes from: ``None``, a checkpoint file as given, or for a run directory the newest
    checkpoint in it that loads (see ``newest_loadable_checkpoint``)."""
    if path in (None, "", "null"):
        return None
    p = Path(str(path)).expanduser()
    if p.is_dir():
        return str(newest_loadable_checkpoint(p))
    if not p.is_file():
        raise FileNotFoundError(f"ckpt_path={path} does not exist; pass a .ckpt file or a run directory")
    reason = load_error(p)
    if reason is not None:
        raise ValueError(
            f"ckpt_path={path} does not load ({reason}); pass its run directory to resume from the newest "
            "checkpoint there that loads"
        )
    return str(p)
