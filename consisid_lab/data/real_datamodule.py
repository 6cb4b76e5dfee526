"""LightningDataModule over real videos (ConsisID layout or a plain folder), optionally read from a feature cache.

``data=consisid data.list=PATH/total_train_data.txt data.root=DIR`` reads the released layout (``DIR``: what the
list's relative paths are relative to, default the current directory); ``data=folder data.root=DIR`` a plain folder.
Splits are by video and deterministic (:func:`~consisid_lab.data.real.split_entries`). Without a feature cache each
item is decoded and analysed on the fly; with ``feature_cache_dir`` the clips are read from the cache that
``python -m consisid_lab.preprocess`` wrote for the same data and model settings, and a cache written under other
settings is refused with an error that says how to rebuild it (never silently used).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import lightning as L
from torch.utils.data import DataLoader, Dataset

from consisid_lab.data.feature_cache import CachedFeatureDataset, check_cache, content_config, content_hash
from consisid_lab.data.real import (
    MIN_FACE_SHARE,
    ClipSampling,
    RealVideoDataset,
    VideoEntry,
    collate_real_batch,
    consisid_entries,
    folder_entries,
    split_entries,
)
from consisid_lab.data.released_layout import BOX_CONFIDENCE, MIN_SOURCE_FRAMES, SEGMENT_TOLERANCE
from consisid_lab.data.sampler import ResumableSampler
from consisid_lab.data.skip_log import SkipLog, count_reasons, read_skipped
from consisid_lab.faces.analysis import MESH_AGREEMENT
from consisid_lab.types import VideoBatch

logger = logging.getLogger(__name__)

LAYOUTS = ("consisid", "folder")
_SPLITS = ("train", "val", "test")


class RealVideoDataModule(L.LightningDataModule):
    """Real captioned videos as train / val / test splits.

    Args:
        root: folder layout: the dataset folder; ConsisID layout: what the list's relative paths are relative to
            (``None``: the current directory, as in the release).
        layout: ``consisid`` (the released layout) or ``folder``.
        list: ConsisID layout: the released ``total_train_data.txt`` (lines ``VIDEOS_DIR,CAPTIONS_JSON,ANNO_BASE``).
        height, width, num_frames, stride, skip_head, skip_tail, position: clip sampling (``num_frames`` = 4k+1);
            in the ConsisID layout the skips and the position apply inside the longest valid segment of the track.
        face_policy: which face MediaPipe picks when there is no track (``largest``, ``center``, ``highest_score``).
        min_face_share: a clip is used only if the chosen face is found in at least this share of its frames.
        mesh_agreement: a detection counts only if the face mesh's eyes and nose lie within this share of the box
            side of the detector's (``None``: any detection with a mesh counts).
        track: ConsisID layout: which track of a multi-person clip (``largest``, ``longest`` or a track id).
        min_source_frames: ConsisID layout: caption rows with ``fps x duration`` under this are dropped (release: 49).
        tolerance: ConsisID layout: valid frames at most this far apart form one segment.
        box_confidence: ConsisID layout: boxes at or under this detector confidence are ignored.
        mask_part: ConsisID layout: the track mask used as the face mask (``face`` or ``head``).
        val_fraction, test_fraction: share of the videos in val / test.
        skipped_path: where unusable items are recorded (``skipped.jsonl`` of the run).
        feature_cache_dir: read clips from this preprocessing cache (``None``: decode on the fly).
        components: the model's ``vae`` / ``text_encoder`` / ``local_encoder`` configs: part of the cache key.
    """

    def __init__(
        self,
        root: str | None = None,
        layout: Literal["consisid", "folder"] = "consisid",
        list: str | None = None,  # noqa: A002 - the released name of the key (data.list=...)
        height: int = 64,
        width: int = 64,
        num_frames: int = 9,
        stride: int = 1,
        skip_head: int = 0,
        skip_tail: int = 0,
        position: float = 0.5,
        face_policy: str = "largest",
        min_face_share: float = MIN_FACE_SHARE,
        track: str | int = "largest",
        min_source_frames: int = MIN_SOURCE_FRAMES,
        tolerance: int = SEGMENT_TOLERANCE,
        box_confidence: float = BOX_CONFIDENCE,
        mask_part: str = "face",
        mesh_agreement: float | None = MESH_AGREEMENT,
        face_pipeline: str = "mediapipe",
        face_models: str | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        batch_size: int = 2,
        num_workers: int = 0,
        seed: int = 0,
        skipped_path: str | None = None,
        feature_cache_dir: str | None = None,
        components: dict | None = None,
    ) -> None:
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"unknown data layout {layout!r}; pick one of {LAYOUTS}")
        if layout == "consisid":
            if list is None:
                raise ValueError(
                    "data=consisid needs data.list=PATH/total_train_data.txt (the released dataset list) and "
                    "data.root=DIR (what the list's relative paths are relative to; default: the current directory)"
                )
            if not Path(list).is_file():
                raise FileNotFoundError(
                    f"data.list={list} does not exist; point it at the released total_train_data.txt"
                )
            root = "." if root is None else root
        elif root is None:
            raise ValueError("data=folder needs data.root=DIR (the folder of captioned videos)")
        if not Path(root).is_dir():
            raise FileNotFoundError(f"data.root={root!r} is not a folder; set data.root=DIR")
        self.root = Path(root)
        self.layout = layout
        self.list_path = Path(list) if list is not None else None
        self.min_source_frames = int(min_source_frames)
        self.sampling = ClipSampling(
            height, width, num_frames, stride, skip_head, skip_tail, position, face_policy, track,
            min_face_share, tolerance, box_confidence, mask_part, mesh_agreement,
            face_pipeline=face_pipeline, face_models=face_models,
        )  # fmt: skip
        self.sampling.validate()
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.skip_log = SkipLog(skipped_path)
        self.feature_cache_dir = feature_cache_dir
        self.components = _plain(components) if components is not None else {}
        self.splits: dict[str, list[VideoEntry]] | None = None
        self.datasets: dict[str, Dataset] = {}

    # ------------------------------------------------------------------ content key
    def content_config(self) -> dict:
        """What the cached content depends on: dataset identity, clip sampling and the encoder configs."""
        dataset = {
            "root": str(self.root.resolve()),
            "layout": self.layout,
            "list": str(self.list_path.resolve()) if self.list_path is not None else None,
            "min_source_frames": self.min_source_frames,
            "val_fraction": self.val_fraction,
            "test_fraction": self.test_fraction,
            "seed": self.seed,
        }
        return content_config(self.sampling.to_dict(), dataset, self.components)

    def content_hash(self) -> str:
        return content_hash(self.content_config())

    # ------------------------------------------------------------------ splits
    def entries(self) -> dict[str, list[VideoEntry]]:
        """Videos per split (entries without a caption are recorded in ``skipped.jsonl`` and left out)."""
        if self.splits is None:
            if self.layout == "consisid":
                assert self.list_path is not None
                found = consisid_entries(self.list_path, self.root, self.skip_log, self.min_source_frames)
            else:
                found = folder_entries(self.root, self.skip_log)
            if not found:
                raise ValueError(f"no usable video in {self.root} (layout {self.layout!r}); see {self.skip_log.path}")
            self.splits = split_entries(found, self.val_fraction, self.test_fraction, self.seed)
            logger.info(
                "%s: %s videos (train / val / test), %d skipped while listing",
                self.root,
                " / ".join(str(len(self.splits[s])) for s in _SPLITS),
                sum(self.skip_log.counts.values()),
            )
        return self.splits

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        if self.feature_cache_dir:
            folder = check_cache(self.feature_cache_dir, self.content_hash())
            for split in _SPLITS:
                self.datasets[split] = CachedFeatureDataset(folder, split)
            logger.info("reading clips from the feature cache %s", folder)
            return
        for split, entries in self.entries().items():
            self.datasets[split] = RealVideoDataset(entries, self.sampling, self.skip_log)

    def dataset(self, split: str) -> Dataset:
        if split not in _SPLITS:
            raise ValueError(f"split {split!r} is not served by the datamodule; pick one of {_SPLITS}")
        self.setup()
        return self.datasets[split]

    def _loader(self, split: str, sampler: ResumableSampler | None = None) -> DataLoader:
        ds = self.dataset(split)
        if len(ds) == 0:
            raise ValueError(f"split {split!r} of {self.root} is empty; adjust val_fraction / test_fraction")
        return DataLoader(
            ds,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=collate_real_batch,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled passes in an order fixed by ``seed``, started where the trainer's global step left off (the
        synthetic datamodule's sampler): a run resumed from a checkpoint sees the batches the uninterrupted run saw.
        An unusable clip is replaced by the next usable one, which depends only on the data, so this holds too."""
        ds = self.dataset("train")
        if len(ds) == 0:
            raise ValueError(f"split 'train' of {self.root} is empty; adjust val_fraction / test_fraction")
        trainer = getattr(self, "trainer", None)
        start = 0
        if trainer is not None:
            start = trainer.global_step * self.batch_size * trainer.accumulate_grad_batches * trainer.world_size
        return self._loader("train", ResumableSampler(len(ds), seed=self.seed, start=start))

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def skip_summary(self) -> dict[str, int]:
        """Skipped items per reason: from ``skipped.jsonl`` (every worker's records) when the run writes one."""
        if self.skip_log.path is not None:
            return count_reasons(read_skipped(self.skip_log.path))
        return dict(self.skip_log.counts)

    def teardown(self, stage: str | None = None) -> None:
        """End of a run: one line counting the skipped items per reason."""
        counts = self.skip_summary()
        if counts:
            where = self.skip_log.path or "memory"
            detail = ", ".join(f"{reason}: {n}" for reason, n in sorted(counts.items()))
            logger.warning("%d items skipped (%s); see %s", sum(counts.values()), detail, where)

    def fixed_batch(self, split: str = "test", num: int | None = None) -> VideoBatch:
        """The first ``num`` (default up to 4) usable clips of ``split`` as one batch (same content on every call)."""
        ds = self.dataset(split)
        num = min(4, len(ds)) if num is None else num
        if not 1 <= num <= len(ds):
            raise ValueError(f"num={num} fixed clips of split {split!r} must be in [1, {len(ds)}]")
        items, seen, i = [], set(), 0
        while len(items) < num and i < len(ds):
            item = ds[i]
            if item["clip_id"] not in seen:  # a skipped clip is replaced by the next one: keep each clip once
                seen.add(item["clip_id"])
                items.append(item)
            i += 1
        return collate_real_batch(items)


def _plain(cfg):
    from consisid_lab.utils.instantiate import to_container

    return to_container(cfg)
