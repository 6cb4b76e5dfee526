"""On-disk cache of preprocessed clips: frames, faces, VAE latents, text embeddings and identity features.

Layout: ``<cache_dir>/<hash16>/`` holds ``config.json`` (the full content hash and the config it was computed from),
``index.jsonl`` (one line per finished clip: key, split, shard, caption, ...) and ``shards/*.safetensors`` (the
tensors of many clips, names ``<slot>/<tensor>``). The hash covers everything that changes the content (codec, text
encoder, local encoder, clip sampling and sizes), so a different config lands in a different folder and a cache is
never read under the wrong config. A shard is fully written (temporary file, then rename) before its clips enter the
index, so an interrupted run resumes from the clips in the index.

Cached tensor names (``VideoBatch.cached``): ``latents`` ``(f, C, h, w)``, ``text`` ``(L, D)``, and for the intra
reference ``id_vec/<name>`` ``(D,)`` and ``id_tok/<name>`` ``(N, D)``, for the cross-face reference
``ref_id_vec/<name>`` and ``ref_id_tok/<name>`` (features of the clean reference, before any training-time noise).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
INDEX_FILE = "index.jsonl"
# Clips that could not be built under this config (key, reason, detail): not retried on resume unless asked.
FAILED_FILE = "failed.jsonl"
SHARD_DIR = "shards"
# Keys that never change the cached content (where things are stored, how many workers run).
_VOLATILE_KEYS = ("cache_dir", "onnx_cache_dir", "num_workers", "batch_size", "skipped_path", "feature_cache_dir")
# Images are stored as uint8 (exact: items are built from uint8 frames), the rest as given.
IMAGE_TENSORS = ("video", "ref_face", "intra_face")
MASK_TENSORS = ("ref_mask", "intra_mask", "face_mask")
ITEM_TENSORS = (*IMAGE_TENSORS, *MASK_TENSORS, "ref_kps", "intra_kps", "kps", "boxes")
ITEM_META = ("caption", "identity", "clip_id", "key", "track_id")


def _strip_volatile(obj):
    if isinstance(obj, dict):
        return {k: _strip_volatile(v) for k, v in obj.items() if k not in _VOLATILE_KEYS}
    if isinstance(obj, list | tuple):
        return [_strip_volatile(v) for v in obj]
    return obj


def content_config(sampling: dict, dataset: dict, components: dict) -> dict:
    """The config that determines the cached content (storage paths and worker counts dropped)."""
    return _strip_volatile(
        {"format_version": CACHE_FORMAT_VERSION, "sampling": sampling, "dataset": dataset, "components": components}
    )


def content_hash(config: dict) -> str:
    """SHA-256 (hex) of :func:`content_config`'s output."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def cache_folder(cache_dir: str | Path, digest: str) -> Path:
    return Path(cache_dir) / digest[:16]


def item_to_tensors(item: dict) -> dict[str, Tensor]:
    """A dataset item's tensors in storage form (images uint8, masks uint8)."""
    out = {}
    for name in ITEM_TENSORS:
        t = item[name]
        if name in IMAGE_TENSORS:
            t = ((t + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
        elif name in MASK_TENSORS:
            t = (t > 0.5).to(torch.uint8)
        out[name] = t.contiguous()
    return out


def tensors_to_item(tensors: dict[str, Tensor]) -> dict:
    """Inverse of :func:`item_to_tensors` (images back to float [-1, 1], masks to float {0, 1})."""
    out: dict = {}
    for name in ITEM_TENSORS:
        t = tensors[name]
        if name in IMAGE_TENSORS:
            t = t.float() / 127.5 - 1.0
        elif name in MASK_TENSORS:
            t = t.float()
        out[name] = t
    return out


class FeatureCacheWriter:
    """Append clips to a cache folder; a folder written under another config is cleared and rebuilt."""

    def __init__(self, folder: str | Path, config: dict, digest: str, shard_size: int = 32) -> None:
        self.folder = Path(folder)
        self.digest = digest
        self.shard_size = int(shard_size)
        self._pending: list[tuple[dict, dict[str, Tensor]]] = []
        cfg_path = self.folder / CONFIG_FILE
        if cfg_path.is_file():
            stored = _read_json(cfg_path)
            if stored is None or stored.get("hash") != digest:
                logger.warning(
                    "feature cache %s was written under another config (hash %s, expected %s); rebuilding it",
                    self.folder,
                    (stored or {}).get("hash"),
                    digest,
                )
                shutil.rmtree(self.folder)
        (self.folder / SHARD_DIR).mkdir(parents=True, exist_ok=True)
        if not cfg_path.is_file():
            _atomic_write(
                cfg_path, json.dumps({"hash": digest, "config": config}, indent=2, sort_keys=True, default=str)
            )
        self.finished = {row["key"] for row in read_index(self.folder)}
        self.failed = {row["key"]: row for row in read_failed(self.folder) if row["key"] not in self.finished}

    def add_failed(self, key: str, reason: str, detail: str = "") -> None:
        """Remember that clip ``key`` cannot be built under this config (one appended line, fsynced)."""
        row = {"key": key, "reason": reason, **({"detail": detail} if detail else {})}
        with (self.folder / FAILED_FILE).open("a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.failed[key] = row

    def forget_failed(self) -> None:
        """Retry every remembered failure (the file is emptied; failures found again are recorded again)."""
        (self.folder / FAILED_FILE).unlink(missing_ok=True)
        self.failed = {}

    def add(self, meta: dict, tensors: dict[str, Tensor]) -> None:
        self._pending.append((meta, tensors))
        if len(self._pending) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        from safetensors.torch import save_file

        name = f"shard-{uuid.uuid4().hex[:12]}.safetensors"
        flat = {
            f"{slot}/{k}": v.detach().cpu().contiguous()
            for slot, (_, ts) in enumerate(self._pending)
            for k, v in ts.items()
        }
        tmp = self.folder / SHARD_DIR / f".{name}.tmp"
        save_file(flat, str(tmp))
        os.replace(tmp, self.folder / SHARD_DIR / name)
        lines = "".join(
            json.dumps({**meta, "shard": name, "slot": slot}, sort_keys=True) + "\n"
            for slot, (meta, _) in enumerate(self._pending)
        )
        with (self.folder / INDEX_FILE).open("a") as f:
            f.write(lines)
            f.flush()
            os.fsync(f.fileno())
        self.finished.update(meta["key"] for meta, _ in self._pending)
        self._pending = []

    def close(self) -> None:
        self.flush()


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_failed(folder: str | Path) -> list[dict]:
    """Rows of a cache folder's ``failed.jsonl`` (a truncated last line is ignored)."""
    path = Path(folder) / FAILED_FILE
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def read_index(folder: str | Path) -> list[dict]:
    """Index rows of a cache folder whose shard exists (a truncated last line is ignored)."""
    folder = Path(folder)
    path = folder / INDEX_FILE
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if (folder / SHARD_DIR / row["shard"]).is_file():
            rows.append(row)
    return rows


def check_cache(cache_dir: str | Path, digest: str) -> Path:
    """The folder of ``digest`` under ``cache_dir``; a clear error when it is absent or holds another config."""
    folder = cache_folder(cache_dir, digest)
    stored = _read_json(folder / CONFIG_FILE) if folder.is_dir() else None
    if stored is None:
        others = sorted(p.name for p in Path(cache_dir).glob("*") if (p / CONFIG_FILE).is_file())
        raise FileNotFoundError(
            f"no feature cache for this config (hash {digest[:16]}) in {cache_dir}"
            + (f"; it holds caches for other configs: {others}" if others else "")
            + ". Run `python -m consisid_lab.preprocess` with the same data and model settings, or unset "
            "data.feature_cache_dir to encode on the fly"
        )
    if stored.get("hash") != digest:
        raise ValueError(
            f"feature cache {folder} was written under another config (hash {stored.get('hash')}, this run "
            f"{digest}); it is not used. Rebuild it with `python -m consisid_lab.preprocess`"
        )
    return folder


class CachedFeatureDataset(Dataset):
    """Clips of one split read from a cache folder: items with ``cached`` filled (nothing is recomputed)."""

    def __init__(self, folder: str | Path, split: str | None = None, digest: str | None = None) -> None:
        self.folder = Path(folder)
        if digest is not None:
            stored = _read_json(self.folder / CONFIG_FILE) or {}
            if stored.get("hash") != digest:
                raise ValueError(
                    f"feature cache {self.folder} has hash {stored.get('hash')}, expected {digest}; rebuild it with "
                    "`python -m consisid_lab.preprocess`"
                )
        rows = read_index(self.folder)
        self.rows = sorted((r for r in rows if split is None or r.get("split") == split), key=lambda r: r["clip_id"])
        self._handles: dict[str, object] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_handles"] = {}  # memory-mapped files are reopened in each worker
        return state

    def _handle(self, shard: str):
        if shard not in self._handles:
            from safetensors import safe_open

            self._handles[shard] = safe_open(str(self.folder / SHARD_DIR / shard), framework="pt")
        return self._handles[shard]

    def __getitem__(self, index: int) -> dict:
        row = self.rows[index]
        h = self._handle(row["shard"])
        prefix = f"{row['slot']}/"
        tensors = {k[len(prefix) :]: h.get_tensor(k) for k in h.keys() if k.startswith(prefix)}  # noqa: SIM118 - safe_open is no dict
        item = tensors_to_item(tensors)
        item.update({k: row[k] for k in ITEM_META if k in row})
        item["cached"] = {k: v for k, v in tensors.items() if k not in ITEM_TENSORS}
        return item
