"""Training data and loops for the stand-in encoders (identity net, tiny CLIP, evaluators).

Everything trains on rendered synthetic faces whose identities come from the "encoder" split (identity net,
CLIP) or the "evaluator" split (evaluators), never from train/val/test. Each identity is rendered in several
videos (different pose, expression, lighting, background, camera) so the networks must ignore those.

The evaluator pool makes the band evaluators band-specific: every video pairs the low part of identity ``i``
with the high part of identity ``perm_v(i)`` (a fresh permutation per video; the first video keeps ``i``), and
each image carries both labels. The low evaluator learns the low labels with the high part as a nuisance, the
high evaluator the high labels with the low part as a nuisance, so a high-band network cannot fit its labels
by keying on head shape or layout (whose edges survive a high-pass), and vice versa.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from torch import Tensor, nn

from consisid_lab.encoders.identity_net import ArcMarginLoss

log = logging.getLogger(__name__)

# How identities of a pool are defined: "identity" = one seed per identity; "band_mixed" = low and high parts
# re-paired per video, with a label per band.
POOL_KINDS = ("identity", "band_mixed")


@dataclass
class Recipe:
    """How the stand-ins are trained (hashed into every cache entry)."""

    name: str = "default"
    encoder_identities: int = 400  # identities of the "encoder" split (identity net, CLIP)
    evaluator_identities: int = 400  # identities of the "evaluator" split (band evaluators)
    # Many short videos beat few long ones: frames of one video share background, lighting and camera, and
    # invariance to those is what the networks must learn (measured, low-band ROC-AUC after 300 steps: 0.95 with
    # 200 identities x 8 videos x 1 frame, 0.88 with 400 identities x 3 videos x 5 frames).
    videos_per_identity: int = 8
    frames_per_video: int = 1  # rendered frames per video (4k + 1); all of them plus the reference are used
    batch_size: int = 128
    identity_steps: int = 200
    clip_steps: int = 150
    low_steps: int = 500  # the low evaluator runs on a 32 x 32 grid: a quarter of the cost per step
    high_steps: int = 400
    lr: float = 3e-3
    weight_decay: float = 5e-4
    arc_scale: float = 30.0
    arc_margin: float = 0.3
    margin_warmup: float = 0.3  # fraction of steps over which the ArcFace margin ramps from 0
    seed: int = 0
    render_workers: int = 2  # processes rendering the training pools (the build budget assumes 2 cores)

    def __post_init__(self) -> None:
        for name in ("encoder_identities", "evaluator_identities"):
            if getattr(self, name) < 2:
                raise ValueError(f"recipe {name}={getattr(self, name)} must be >= 2 (a margin loss needs classes)")
        if self.videos_per_identity < 1:
            raise ValueError(f"recipe videos_per_identity={self.videos_per_identity} must be >= 1")
        if self.frames_per_video < 1 or (self.frames_per_video - 1) % 4 != 0:
            raise ValueError(f"recipe frames_per_video={self.frames_per_video} must be 4k + 1 (1, 5, 9, ...)")

    @classmethod
    def tiny(cls) -> Recipe:
        """Seconds-long recipe for tests: right shapes and interfaces, weak networks."""
        return cls(
            name="tiny",
            encoder_identities=8,
            evaluator_identities=8,
            videos_per_identity=2,
            frames_per_video=1,
            batch_size=16,
            identity_steps=3,
            clip_steps=3,
            low_steps=3,
            high_steps=3,
            render_workers=1,
        )

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class FacePool:
    """Rendered training faces of one split."""

    images: Tensor  # (N, 3, H, W) uint8
    labels: Tensor  # (N,) long, identity index within the pool (the low-part identity in a band-mixed pool)
    high_labels: Tensor  # (N,) long, identity whose high part the image shows (== labels in an identity pool)
    ref_index: Tensor  # (V,) long, rows of ``images`` that are reference faces (one per video)
    captions: list[str]  # (L,) attribute caption of each label (empty strings when not needed)

    @property
    def num_classes(self) -> int:
        return len(self.captions)

    def batch(self, idx: Tensor, band: str = "low") -> tuple[Tensor, Tensor]:
        """Images in [-1, 1] ``(B, 3, H, W)`` and the labels ``(B,)`` of ``band`` ("low"/"full" or "high")."""
        labels = self.high_labels if band == "high" else self.labels
        return self.images[idx].float().div_(127.5).sub_(1.0), labels[idx]


def _video_seed(tag: str, label: int, video: int, seed: int) -> int:
    """Deterministic 31-bit seed for one training video; independent across tags and recipe seeds."""
    tag_words = [ord(c) for c in tag]
    return int(np.random.SeedSequence([seed, *tag_words, label, video]).generate_state(1)[0] & 0x7FFFFFFF)


def _high_partner(label: int, video: int, num_identities: int, seed: int) -> int:
    """Identity whose high part is paired with ``label``'s low part in ``video`` of a band-mixed pool."""
    if video == 0:
        return label
    perm = np.random.default_rng([seed, 7919, video]).permutation(num_identities)
    return int(perm[label])


def _render_identities(
    cfg, split: str, labels: list[int], num_identities: int, videos: int, seed: int, kind: str
) -> tuple[np.ndarray, list[int], list[int], list[int]]:
    """Render ``videos`` clips of each label: ``(images (N, H, W, 3) uint8, labels, high labels, reference rows)``.

    Top-level so that pool workers can run it.
    """
    from consisid_lab.data.synthetic import identity_seed, render_clip, sample_identity, sample_motion

    images: list[np.ndarray] = []
    out_labels: list[int] = []
    high_labels: list[int] = []
    ref_rows: list[int] = []
    for label in labels:
        for v in range(videos):
            high = _high_partner(label, v, num_identities, seed) if kind == "band_mixed" else label
            identity = sample_identity(cfg, identity_seed(split, label), identity_seed(split, high))
            motion = sample_motion(cfg, _video_seed(f"{split}/{kind}", label, v, seed))
            clip = render_clip(
                cfg, identity, motion, ref_motion_seed=_video_seed(f"{split}/{kind}/ref", label, v, seed)
            )
            if not (np.isfinite(clip.frames).all() and np.isfinite(clip.ref_face).all()):
                log.warning(
                    "generator produced non-finite pixels for %s identity low=%d high=%d, video %d; set to 0",
                    split,
                    label,
                    high,
                    v,
                )
            ref_rows.append(len(images) + clip.frames.shape[0])
            images.extend(clip.frames)
            images.append(clip.ref_face)
            out_labels.extend([label] * (clip.frames.shape[0] + 1))
            high_labels.extend([high] * (clip.frames.shape[0] + 1))
    stacked = np.nan_to_num(np.stack(images), nan=0.0, posinf=1.0, neginf=0.0)
    stacked = np.clip(np.rint(stacked * 255.0), 0, 255).astype(np.uint8)  # (N, H, W, 3)
    return stacked, out_labels, high_labels, ref_rows


def render_pool(
    generator_config,
    split: str,
    num_identities: int,
    recipe: Recipe,
    kind: str = "identity",
    captioner: Callable[[list], list[str]] | None = None,
    on_identities: Callable[[int], None] | None = None,
    workers: int = 1,
) -> FacePool:
    """Render ``videos_per_identity`` clips of ``num_identities`` identities of ``split``.

    kind "identity": label = the identity (low and high parts from its seed).
    kind "band_mixed": video ``v`` of label ``i`` shows the low part of ``i`` and the high part of a permuted
    identity of the same split (``high_labels``), see the module docstring.
    workers > 1 renders in that many spawned processes (the renderer runs one thread per process).
    """
    from consisid_lab.data.synthetic import identity_seed, sample_identity

    if kind not in POOL_KINDS:
        raise ValueError(f"pool kind={kind!r} is not one of {POOL_KINDS}")
    # Fewer frames per video than the benchmark's clips: more videos per identity for the same rendering time.
    cfg = replace(generator_config, num_frames=recipe.frames_per_video)
    chunks = [c.tolist() for c in np.array_split(np.arange(num_identities), max(1, workers * 4)) if len(c)]
    args = (cfg, split)
    rest = (num_identities, recipe.videos_per_identity, recipe.seed, kind)
    results = []
    if workers > 1 and len(chunks) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn, not fork: forking a process whose torch thread pools are running can deadlock.
        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as ex:
            futures = [ex.submit(_render_identities, *args, chunk, *rest) for chunk in chunks]
            for chunk, fut in zip(chunks, futures):
                results.append(fut.result())
                if on_identities is not None:
                    on_identities(len(chunk))
    else:
        for chunk in chunks:
            results.append(_render_identities(*args, chunk, *rest))
            if on_identities is not None:
                on_identities(len(chunk))
    offset, ref_rows, labels, high_labels = 0, [], [], []
    for images, chunk_labels, chunk_high, chunk_refs in results:
        ref_rows.extend(r + offset for r in chunk_refs)
        labels.extend(chunk_labels)
        high_labels.extend(chunk_high)
        offset += images.shape[0]
    stacked = np.concatenate([r[0] for r in results])  # (N, H, W, 3) uint8
    population = [sample_identity(cfg, identity_seed(split, label)) for label in range(num_identities)]
    return FacePool(
        images=torch.from_numpy(stacked).permute(0, 3, 1, 2).contiguous(),
        labels=torch.tensor(labels, dtype=torch.long),
        high_labels=torch.tensor(high_labels, dtype=torch.long),
        ref_index=torch.tensor(ref_rows, dtype=torch.long),
        captions=captioner(population) if captioner is not None else [""] * num_identities,
    )


def _lr_at(step: int, steps: int, base: float) -> float:
    """Linear warm-up over 5% of the steps, then cosine decay to 2% of the base rate."""
    warm = max(1, steps // 20)
    if step < warm:
        return base * (step + 1) / warm
    t = (step - warm) / max(1, steps - warm)
    return base * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * t)))


def _augment(x: Tensor, generator: torch.Generator) -> Tensor:
    """Per-image brightness and contrast jitter ``(B, 3, H, W)`` in [-1, 1] (lighting beyond the renderer's)."""
    b = x.shape[0]
    gain = 1.0 + 0.15 * (torch.rand(b, 1, 1, 1, generator=generator) * 2 - 1)
    bias = 0.1 * (torch.rand(b, 1, 1, 1, generator=generator) * 2 - 1)
    return (x * gain + bias).clamp_(-1, 1)


def train_margin_net(
    net: nn.Module,
    pool: FacePool,
    recipe: Recipe,
    steps: int,
    seed: int,
    on_step: Callable[[], None] | None = None,
    band: str = "full",
) -> dict:
    """Train ``net`` (images -> un-normalised embeddings, ``net.embed_dim``) with the ArcFace margin loss on the
    labels of ``band`` (``FacePool.batch``)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    head = ArcMarginLoss(net.embed_dim, pool.num_classes, scale=recipe.arc_scale, margin=recipe.arc_margin)
    params = list(net.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    net.train()
    losses: list[float] = []
    n = pool.labels.numel()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, recipe.lr)
        margin = recipe.arc_margin * min(1.0, (step + 1) / max(1, recipe.margin_warmup * steps))
        idx = torch.randint(n, (min(recipe.batch_size, n),), generator=gen)
        x, y = pool.batch(idx, band)
        loss = head(net(_augment(x, gen)), y, margin=margin)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 5.0)
        opt.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step()
    net.eval()
    tail = losses[-max(1, steps // 10) :]
    return {"steps": steps, "final_loss": float(np.mean(tail)), "first_loss": losses[0] if losses else None}


def train_clip(
    clip: nn.Module,
    pool: FacePool,
    recipe: Recipe,
    steps: int,
    seed: int,
    on_step: Callable[[], None] | None = None,
) -> dict:
    """Contrastive training of the tiny CLIP on (reference face, attribute caption) with open_clip's ClipLoss.

    Each batch takes distinct identities so that no caption appears twice (a duplicate would be a false
    negative for the contrastive loss).
    """
    from open_clip import ClipLoss

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    loss_fn = ClipLoss()
    opt = torch.optim.AdamW(clip.parameters(), lr=recipe.lr / 3, weight_decay=0.05)
    ref_labels = pool.labels[pool.ref_index]  # (V,)
    per_label = [pool.ref_index[ref_labels == k] for k in range(pool.num_classes)]
    clip.train()
    losses: list[float] = []
    b = min(recipe.batch_size, pool.num_classes)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, recipe.lr / 3)
        labels = torch.randperm(pool.num_classes, generator=gen)[:b]
        rows = torch.stack([per_label[k][torch.randint(len(per_label[k]), (1,), generator=gen)][0] for k in labels])
        x, _ = pool.batch(rows)
        image = clip.encode_image(_augment(x, gen))
        text = clip.encode_text([pool.captions[k] for k in labels.tolist()])
        loss = loss_fn(image, text, clip.logit_scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(clip.parameters(), 5.0)
        opt.step()
        with torch.no_grad():
            # Same clamp as open_clip's training script: logit scale at most 100.
            clip.model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        if on_step is not None:
            on_step()
    clip.eval()
    tail = losses[-max(1, steps // 10) :]
    return {"steps": steps, "final_loss": float(np.mean(tail)), "first_loss": losses[0] if losses else None}


def parallel_chunks(fn: Callable, arg_lists: list[tuple], workers: int = 1) -> list:
    """``[fn(*args) for args in arg_lists]``, in ``workers`` spawned processes when more than one."""
    if workers > 1 and len(arg_lists) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn, not fork: forking a process whose torch thread pools are running can deadlock.
        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as ex:
            return [f.result() for f in [ex.submit(fn, *args) for args in arg_lists]]
    return [fn(*args) for args in arg_lists]


def _render_clips_chunk(cfg, labels: list[int] | np.ndarray, videos: int, seed: int) -> np.ndarray:
    """Whole clips ``(N, F, H, W, 3)`` uint8 of identities ``labels`` of the "encoder" split (top-level: picklable)."""
    from consisid_lab.data.synthetic import identity_seed, render_clip, sample_identity, sample_motion

    out = []
    for label in labels:
        identity = sample_identity(cfg, identity_seed("encoder", int(label)))
        for v in range(videos):
            motion = sample_motion(cfg, _video_seed("encoder/clips", int(label), v, seed))
            out.append(render_clip(cfg, identity, motion).frames)
    stacked = np.nan_to_num(np.stack(out), nan=0.0, posinf=1.0, neginf=0.0)
    return np.clip(np.rint(stacked * 255.0), 0, 255).astype(np.uint8)
