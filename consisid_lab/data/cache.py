"""Optional disk cache of rendered synthetic clips, keyed by a hash of the generator config.

Layout: ``<root>/synthetic-<hash16>/<identity_seed>_<video_seed>.npz``. Each entry stores its arrays, the caption
and a JSON header with the full config hash, the seeds and a SHA-256 of the array bytes. On read the header and
checksum are verified; an entry that does not match is logged, re-rendered and overwritten, never used: stale
(written under another config, generator version or renderer source) or corrupt (truncated, unreadable or
altered). Writes go to a temporary file first and are renamed into place, so concurrent DataLoader workers never
see half an entry.

Rendering a 64x64 clip takes milliseconds, so the cache pays off for large frames (e.g. 480x720, 49 frames).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from consisid_lab.data.synthetic import (
    GENERATOR_VERSION,
    Clip,
    SyntheticConfig,
    make_clip,
    reference_seed,
    sample_identity,
    sample_motion,
    sample_reference_motion,
)

logger = logging.getLogger(__name__)

_ARRAYS = (
    "frames",
    "keypoints",
    "masks",
    "boxes",
    "ref_face",
    "ref_keypoints",
    "ref_mask",
    "ref_box",
    "head_alpha",
    "ref_head_alpha",
)


@functools.cache
def renderer_source_hash() -> str:
    """Hash of the renderer's source (generator and its filters): an edited renderer makes every cached clip and
    every stand-in network trained on rendered faces stale, version bump or not."""
    from consisid_lab.data import spectral_filters, synthetic

    digest = hashlib.sha256()
    for module in (synthetic, spectral_filters):
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()


def config_hash(cfg: SyntheticConfig) -> str:
    """SHA-256 (hex) of the generator config, ``GENERATOR_VERSION`` and the renderer's source."""
    payload = json.dumps(
        {"config": cfg.to_dict(), "generator_version": GENERATOR_VERSION, "source": renderer_source_hash()},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def _checksum(arrays: dict[str, np.ndarray], caption: str) -> str:
    h = hashlib.sha256()
    for name in _ARRAYS:
        a = np.ascontiguousarray(arrays[name])
        h.update(name.encode())
        h.update(str(a.dtype).encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    h.update(caption.encode())
    return h.hexdigest()


class ClipCache:
    """Disk cache for :func:`consisid_lab.data.synthetic.make_clip` under one generator config."""

    def __init__(self, root: str | os.PathLike, cfg: SyntheticConfig) -> None:
        cfg.validate()
        self.cfg = cfg
        self.hash = config_hash(cfg)
        self.dir = Path(root) / f"synthetic-{self.hash[:16]}"
        self.hits = 0
        self.misses = 0
        self.rebuilds = 0

    def path(self, identity_seed: int, video_seed: int) -> Path:
        return self.dir / f"{int(identity_seed)}_{int(video_seed)}.npz"

    def get(self, identity_seed: int, video_seed: int) -> Clip:
        """``make_clip(cfg, identity_seed, video_seed)``, read from the cache or rendered and stored."""
        path = self.path(identity_seed, video_seed)
        if path.exists():
            clip, problem = self._load(path, identity_seed, video_seed)
            if clip is not None:
                self.hits += 1
                return clip
            logger.warning("synthetic clip cache entry %s is %s; re-rendering it", path, problem)
            self.rebuilds += 1
        else:
            self.misses += 1
        clip = make_clip(self.cfg, identity_seed, video_seed)
        self._store(path, clip, identity_seed, video_seed)
        return clip

    def _header(self, identity_seed: int, video_seed: int, checksum: str) -> dict:
        return {
            "config_hash": self.hash,
            "config": self.cfg.to_dict(),
            "generator_version": GENERATOR_VERSION,
            "identity_seed": int(identity_seed),
            "video_seed": int(video_seed),
            "checksum": checksum,
        }

    def _store(self, path: Path, clip: Clip, identity_seed: int, video_seed: int) -> None:
        arrays = {name: getattr(clip, name) for name in _ARRAYS}
        header = self._header(identity_seed, video_seed, _checksum(arrays, clip.caption))
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".npz")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, header=np.array(json.dumps(header)), caption=np.array(clip.caption), **arrays)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def _load(self, path: Path, identity_seed: int, video_seed: int) -> tuple[Clip | None, str]:
        try:
            with np.load(path, allow_pickle=False) as z:
                header = json.loads(str(z["header"]))
                caption = str(z["caption"])
                arrays = {name: z[name] for name in _ARRAYS}
        except Exception as e:  # any unreadable entry is rebuilt: zip, npy and JSON errors alike
            return None, f"unreadable ({type(e).__name__}: {e})"
        expected = self._header(identity_seed, video_seed, header.get("checksum", ""))
        if header != expected:
            return None, f"stale (config hash {str(header.get('config_hash'))[:16]}, expected {self.hash[:16]})"
        if _checksum(arrays, caption) != header["checksum"]:
            return None, "corrupt (checksum mismatch)"
        identity = sample_identity(self.cfg, identity_seed)
        motion = sample_motion(self.cfg, video_seed)
        return (
            Clip(
                caption=caption,
                identity=identity,
                motion=motion,
                ref_motion=sample_reference_motion(reference_seed(video_seed)),
                **arrays,
            ),
            "",
        )
