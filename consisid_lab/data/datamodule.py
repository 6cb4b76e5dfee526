"""LightningDataModule over the synthetic benchmark: disjoint identity splits, clips rendered on the fly.

Item ``index`` of a split is clip ``k = index % clips_per_identity`` of identity ``i = index // clips_per_identity``;
its identity seed is ``identity_seed(split, i)`` and its video seed a hash of ``(seed, split, i, k)``, so every item
is a pure function of its index: DataLoader workers, shuffling and restarts all see the same clips.
"""

from __future__ import annotations

import logging

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from consisid_lab.data.cache import ClipCache
from consisid_lab.data.sampler import ResumableSampler
from consisid_lab.data.synthetic import (
    SPLIT_CAPACITY,
    SPLITS,
    Clip,
    SyntheticConfig,
    identity_seed,
    make_clip,
    whiten_outside,
)
from consisid_lab.types import VideoBatch

logger = logging.getLogger(__name__)

_DATA_SPLITS = ("train", "val", "test")


def video_seed(split: str, identity_index: int, clip_index: int, seed: int = 0) -> int:
    """Deterministic 63-bit video seed of clip ``clip_index`` of identity ``identity_index`` in ``split``."""
    state = np.random.SeedSequence([int(seed), SPLITS.index(split), int(identity_index), int(clip_index)])
    return int(state.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def _images(x: np.ndarray) -> torch.Tensor:
    """``(..., H, W, 3)`` in [0, 1] -> ``(..., 3, H, W)`` in [-1, 1]."""
    t = torch.from_numpy(np.ascontiguousarray(x))
    return (t.movedim(-1, -3) * 2.0 - 1.0).contiguous()


def _mask(x: np.ndarray) -> torch.Tensor:
    """``(..., H, W)`` bool -> ``(..., 1, H, W)`` float {0, 1}."""
    return torch.from_numpy(np.ascontiguousarray(x)).unsqueeze(-3).float()


class SyntheticClipDataset(Dataset):
    """Clips of one split, rendered per index (or read from a :class:`ClipCache`)."""

    def __init__(
        self,
        split: str,
        num_identities: int,
        clips_per_identity: int,
        cfg: SyntheticConfig,
        seed: int = 0,
        cache: ClipCache | None = None,
        memory_cache: bool = False,
        reference_image: str = "face",
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; valid splits: {SPLITS}")
        if not 1 <= num_identities <= SPLIT_CAPACITY:
            raise ValueError(f"num_identities={num_identities} for split {split!r} must be in [1, {SPLIT_CAPACITY}]")
        if clips_per_identity < 1:
            raise ValueError(f"clips_per_identity={clips_per_identity} must be >= 1")
        check_reference_image(reference_image)
        cfg.validate()
        self.split = split
        self.reference_image = reference_image
        self.num_identities = int(num_identities)
        self.clips_per_identity = int(clips_per_identity)
        self.cfg = cfg
        self.seed = int(seed)
        self.cache = cache
        # Rendered clips kept in RAM (about 0.7 MB per 64 x 64 x 9 clip): every pass after the first is free.
        self._memory: dict[int, Clip] | None = {} if memory_cache else None

    def __len__(self) -> int:
        return self.num_identities * self.clips_per_identity

    def _check(self, index: int) -> int:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} clips of split {self.split!r}")
        return int(index) % len(self)

    def identity_of(self, index: int) -> int:
        """Identity index (within the split) of item ``index``."""
        return self._check(index) // self.clips_per_identity

    def seeds(self, index: int) -> tuple[int, int]:
        """``(identity_seed, video_seed)`` of item ``index``."""
        index = self._check(index)
        i, k = divmod(index, self.clips_per_identity)
        return identity_seed(self.split, i), video_seed(self.split, i, k, self.seed)

    def intra_frame(self, index: int) -> int:
        """The frame of the clip used as in-clip reference (``intra_face``): fixed per clip, spread over frames
        (frame 0 when the reference image is the first frame)."""
        if self.reference_image == "first_frame":
            return 0
        return self.seeds(index)[1] % self.cfg.num_frames

    def clip(self, index: int) -> Clip:
        index = self._check(index)
        if self._memory is not None and index in self._memory:
            return self._memory[index]
        id_seed, vid_seed = self.seeds(index)
        clip = self.cache.get(id_seed, vid_seed) if self.cache is not None else make_clip(self.cfg, id_seed, vid_seed)
        if self._memory is not None:
            self._memory[index] = clip
        return clip

    def __getitem__(self, index: int) -> dict:
        index = self._check(index)
        clip = self.clip(index)
        j = self.intra_frame(index)
        assert clip.head_alpha is not None, "clips carry head alphas (render_clip sets them)"
        # Image-to-video (first_frame): the whole frame j = 0, background included, is both references.
        first_frame = self.reference_image == "first_frame"
        intra = {
            "intra_face": _images(
                clip.frames[j] if first_frame else whiten_outside(clip.frames[j], clip.head_alpha[j])
            ),
            "intra_kps": torch.from_numpy(clip.keypoints[j].copy()),
            "intra_mask": _mask(clip.masks[j]),
        }
        if first_frame:
            ref = {"ref_face": intra["intra_face"], "ref_kps": intra["intra_kps"], "ref_mask": intra["intra_mask"]}
        else:
            ref = {
                "ref_face": _images(clip.ref_face),  # (3, H, W)
                "ref_kps": torch.from_numpy(clip.ref_keypoints.copy()),  # (5, 2)
                "ref_mask": _mask(clip.ref_mask),  # (1, H, W)
            }
        return {
            "video": _images(clip.frames),  # (F, 3, H, W)
            "caption": clip.caption,
            **ref,
            **intra,
            "kps": torch.from_numpy(clip.keypoints.copy()),  # (F, 5, 2)
            "face_mask": _mask(clip.masks),  # (F, 1, H, W)
            "boxes": torch.from_numpy(clip.boxes.copy()),  # (F, 4)
            "identity": index // self.clips_per_identity,
            "clip_id": index,
        }


REFERENCE_IMAGES = ("face", "first_frame")


def check_reference_image(value: str) -> None:
    if value not in REFERENCE_IMAGES:
        raise ValueError(
            f"data.reference_image={value!r} is unknown; pick face (the identity reference: a near-frontal face on "
            "white, as ConsisID's) or first_frame (the clip's own first frame: image-to-video, for a base backbone)"
        )


def collate_video_batch(items: list[dict]) -> VideoBatch:
    """Stack dataset items into a :class:`VideoBatch`."""
    if not items:
        raise ValueError("cannot collate an empty list of clips")

    def stack(name: str) -> torch.Tensor:
        return torch.stack([it[name] for it in items])

    return VideoBatch(
        video=stack("video"),
        caption=[it["caption"] for it in items],
        ref_face=stack("ref_face"),
        ref_kps=stack("ref_kps"),
        ref_mask=stack("ref_mask"),
        intra_face=stack("intra_face"),
        intra_kps=stack("intra_kps"),
        intra_mask=stack("intra_mask"),
        kps=stack("kps"),
        face_mask=stack("face_mask"),
        boxes=stack("boxes"),
        identity=torch.tensor([it["identity"] for it in items], dtype=torch.long),
        clip_id=torch.tensor([it["clip_id"] for it in items], dtype=torch.long),
    )


def evaluation_order(ds: SyntheticClipDataset) -> list[int]:
    """Evaluation clips clip-major: the first clip of every identity, then the second, and so on.

    A validation or test pass scores its first ``sampling.val_batches`` / ``test_batches`` batches; in storage
    order (identity-major) two test batches of 8 hold only 4 identities, and a batch of 4 a single one, which
    leaves no other identity for the shuffled-reference controls (``identity_gap`` would be missing). In this order
    every batch holds ``min(batch_size, identities)`` distinct identities, and the first batches cover as many
    identities as they can.
    """
    n, k = ds.num_identities, ds.clips_per_identity
    return [i * k + c for c in range(k) for i in range(n)]


class SyntheticDataModule(L.LightningDataModule):
    """The embedded benchmark as a datamodule: train / val / test identities are disjoint by construction
    (disjoint seed ranges of :func:`identity_seed`, also disjoint from the stand-in encoders' ``encoder`` and
    ``evaluator`` identities). ``seed`` changes the videos (motion), never which identities a split holds."""

    def __init__(
        self,
        num_train_identities: int = 512,
        num_val_identities: int = 16,
        num_test_identities: int = 32,
        clips_per_identity: int = 4,
        height: int = 64,
        width: int = 64,
        num_frames: int = 9,
        low_strength: float = 1.0,
        high_strength: float = 1.0,
        identity_mode: str = "both",
        batch_size: int = 8,
        num_workers: int = 0,
        cache_dir: str | None = None,
        seed: int = 0,
        supersample: int = 2,
        memory_cache: bool = False,
        reference_image: str = "face",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.cfg = SyntheticConfig(
            height=height,
            width=width,
            num_frames=num_frames,
            supersample=supersample,
            low_strength=low_strength,
            high_strength=high_strength,
            identity_mode=identity_mode,
        )
        self.counts = {"train": num_train_identities, "val": num_val_identities, "test": num_test_identities}
        self.clips_per_identity = clips_per_identity
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.cache_dir = cache_dir
        self.seed = seed
        self.memory_cache = bool(memory_cache)
        self.reference_image = reference_image
        self.datasets: dict[str, SyntheticClipDataset] = {}
        self._validate()

    def _validate(self) -> None:
        """Every setting checked before any rendering: the error names the setting and its valid range."""
        self.cfg.validate()
        check_reference_image(self.reference_image)
        for split, n in self.counts.items():
            if not isinstance(n, int | np.integer) or not 1 <= n <= SPLIT_CAPACITY:
                raise ValueError(
                    f"num_{split}_identities={n!r} is outside [1, {SPLIT_CAPACITY}] "
                    f"(each split has {SPLIT_CAPACITY} identities)"
                )
        for name, value, lo in (
            ("clips_per_identity", self.clips_per_identity, 1),
            ("batch_size", self.batch_size, 1),
            ("num_workers", self.num_workers, 0),
            ("seed", self.seed, 0),
        ):
            if not isinstance(value, int | np.integer) or value < lo:
                raise ValueError(f"{name}={value!r} must be an integer >= {lo}")

    def setup(self, stage: str | None = None) -> None:
        self._validate()
        cache = ClipCache(self.cache_dir, self.cfg) if self.cache_dir else None
        for split in _DATA_SPLITS:
            if split not in self.datasets:
                self.datasets[split] = SyntheticClipDataset(
                    split,
                    self.counts[split],
                    self.clips_per_identity,
                    self.cfg,
                    seed=self.seed,
                    cache=cache,
                    memory_cache=self.memory_cache and split == "train",
                    reference_image=self.reference_image,
                )

    def dataset(self, split: str) -> SyntheticClipDataset:
        if split not in _DATA_SPLITS:
            raise ValueError(f"split {split!r} is not served by the datamodule; pick one of {_DATA_SPLITS}")
        if split not in self.datasets:
            self.setup()
        return self.datasets[split]

    def _loader(self, split: str, sampler: ResumableSampler | list[int] | None = None) -> DataLoader:
        return DataLoader(
            self.dataset(split),
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=collate_video_batch,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled passes over the training clips in an order fixed by ``seed``, started where the trainer's
        global step left off: a run resumed from a checkpoint sees the batches the uninterrupted run saw."""
        ds = self.dataset("train")
        trainer = getattr(self, "trainer", None)
        start, rank, world = 0, 0, 1
        if trainer is not None:
            rank, world = int(trainer.global_rank), int(trainer.world_size)
            start = trainer.global_step * self.batch_size * trainer.accumulate_grad_batches * world
            connector = getattr(trainer, "_accelerator_connector", None)
            if world > 1 and connector is not None and connector.use_distributed_sampler:
                raise ValueError(
                    "the training sampler shards itself across processes, but trainer.use_distributed_sampler "
                    "is true (Lightning would wrap it and list its 10^9 positions); set "
                    "trainer.use_distributed_sampler=false (conf/trainer/default.yaml does)"
                )
        sampler = ResumableSampler(len(ds), seed=self.seed, start=start, rank=rank, num_replicas=world)
        return self._loader("train", sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", evaluation_order(self.dataset("val")))

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", evaluation_order(self.dataset("test")))

    def fixed_indices(self, split: str = "test", num: int | None = None) -> list[int]:
        """Item indices of a fixed evaluation set: the first clip of identities ``0 .. num - 1`` of ``split``
        (``num`` defaults to ``min(4, identities in the split)``)."""
        ds = self.dataset(split)
        num = min(4, ds.num_identities) if num is None else num
        if not 1 <= num <= ds.num_identities:
            raise ValueError(f"num={num} fixed clips of split {split!r} must be in [1, {ds.num_identities}]")
        return [i * ds.clips_per_identity for i in range(num)]

    def fixed_clips(self, split: str = "test", num: int | None = None) -> list[Clip]:
        """The fixed clips (full :class:`Clip` objects) used for validation sampling."""
        ds = self.dataset(split)
        return [ds.clip(i) for i in self.fixed_indices(split, num)]

    def fixed_batch(self, split: str = "test", num: int | None = None) -> VideoBatch:
        """The fixed clips as one :class:`VideoBatch` (same content on every call and every machine)."""
        ds = self.dataset(split)
        return collate_video_batch([ds[i] for i in self.fixed_indices(split, num)])
