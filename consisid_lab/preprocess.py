"""Preprocessing task: `python -m consisid_lab.preprocess data=folder data.root=DIR [cache_dir=...] [num_workers=N]`,
or for the released layout `data=consisid data.list=PATH/total_train_data.txt data.root=DIR`.

Decodes every video of the dataset, samples its clip, finds and tracks the face (MediaPipe), picks the references
inside and outside the clip, and caches frames, VAE latents, text embeddings and identity features in shards under
``<cache_dir>/<config hash>/`` (see :mod:`consisid_lab.data.feature_cache`). Clips already in the cache are skipped
(resumable), and so are clips that failed under the same config (remembered in ``failed.jsonl`` of the cache folder;
``retry_failed=true`` tries them again); decoding and face analysis run in ``num_workers`` DataLoader workers while
the main process encodes.
Unusable videos go to ``skipped.jsonl`` in the run folder; counts and throughput go to the log and to
``preprocess_metrics.json``. Training reads the cache with ``data.feature_cache_dir=<cache_dir>``.

With no real encoder weights configured (``model/local_encoder=insightface_evaclip`` without ``arcface_dir`` /
``clip_checkpoint``), the stand-in encoders are used, so the real-data path runs on any machine.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset

from consisid_lab.data.feature_cache import FeatureCacheWriter, cache_folder, item_to_tensors
from consisid_lab.data.real import SAMPLE_ERRORS, ClipBuilder, VideoEntry, skip_reason
from consisid_lab.data.skip_log import SKIPPED_FILE, SkipLog, count_reasons, read_skipped
from consisid_lab.faces.analysis import NoFaceError
from consisid_lab.types import IdentityFeatures
from consisid_lab.utils.instantiate import instantiate

log = logging.getLogger(__name__)

METRICS_FILE = "preprocess_metrics.json"
UNEXPECTED_PREFIX = "error:"  # skip_reason() of an exception that is no known bad-sample error
REAL_LOCAL_ENCODER = "consisid_lab.models.local_encoder_real.RealFaceLocalEncoder"


class _ClipJobs(Dataset):
    """One job per clip to build; a worker returns the item, or the reason it is unusable."""

    def __init__(self, jobs: list[tuple[str, int, VideoEntry]], builder: ClipBuilder) -> None:
        self.jobs = jobs
        self.builder = builder

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, i: int) -> dict:
        split, index, entry = self.jobs[i]
        out: dict[str, Any] = {"split": split, "entry": entry}
        try:
            out["item"] = self.builder.build(entry, identity=index, clip_id=index)
        except SAMPLE_ERRORS as e:
            out["error"] = (skip_reason(e), str(e))
        except Exception as e:  # noqa: BLE001 - one bad file must not stop a long run; it is logged with its reason
            log.exception("unexpected error while preparing %s", entry.path)
            out["error"] = (skip_reason(e), str(e))
        return out


def _unbatched(x):
    return x


def local_encoder_config(cfg: DictConfig) -> Any:
    """The local encoder to run: the configured one, or the stand-ins when a real one names no weights."""
    enc = cfg.model.local_encoder
    if enc is not None and enc.get("_target_") == REAL_LOCAL_ENCODER:
        from consisid_lab.models.local_encoder_real import has_real_weights

        if not has_real_weights(
            enc.get("arcface_dir"), enc.get("clip_checkpoint"), enc.get("clip_random_init", False)
        ):
            log.warning(
                "model.local_encoder names no ArcFace / CLIP weights: identity features come from the stand-in "
                "encoders (%s)",
                cfg.fallback_local_encoder.get("_target_"),
            )
            return cfg.fallback_local_encoder
    return enc


def identity_tensors(feats: IdentityFeatures, prefix: str) -> dict[str, torch.Tensor]:
    """``IdentityFeatures`` rows as cache tensors ``<prefix>id_vec/<name>`` and ``<prefix>id_tok/<name>``."""
    out = {f"{prefix}id_vec/{k}": v for k, v in feats.vectors.items()}
    out.update({f"{prefix}id_tok/{k}": v for k, v in feats.tokens.items()})
    return out


class Encoders:
    """The frozen encoders whose outputs are cached."""

    def __init__(self, cfg: DictConfig) -> None:
        # Encoders without pretrained weights (the bag-of-words text encoder) start from the run seed, so the cached
        # embeddings are a function of the config (which keys the cache).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(cfg.seed))
            self.vae = instantiate(cfg.model.vae).eval()
            self.text = instantiate(cfg.model.text_encoder).eval() if cfg.get("cache_text", True) else None
            local = local_encoder_config(cfg)
            self.local = instantiate(local).eval() if local is not None else None

    @torch.no_grad()
    def __call__(self, items: list[dict]) -> list[dict[str, torch.Tensor] | str]:
        """Cached tensors per item, or the reason an item's reference could not be encoded."""
        video = torch.stack([it["video"] for it in items])  # (B, F, 3, H, W)
        latents = self.vae.encode(video)  # (B, f, C, h, w)
        text = self.text([it["caption"] for it in items]) if self.text is not None else None  # (B, L, D)
        ids = self._identity(items)
        out: list[dict[str, torch.Tensor] | str] = []
        for b in range(len(items)):
            if isinstance(ids[b], str):
                out.append(ids[b])
                continue
            cached = {"latents": latents[b]}
            if text is not None:
                cached["text"] = text[b]
            cached.update(ids[b])
            out.append(cached)
        return out

    def _identity(self, items: list[dict]) -> list[dict[str, torch.Tensor] | str]:
        if self.local is None:
            return [{} for _ in items]
        try:
            intra = self.local(torch.stack([it["intra_face"] for it in items]))
            ref = self.local(torch.stack([it["ref_face"] for it in items]))
        except NoFaceError:
            if len(items) == 1:
                return ["no face (reference)"]
            return [r for it in items for r in self._identity([it])]  # find the item whose reference fails
        return [
            {**identity_tensors(intra.index(b), ""), **identity_tensors(ref.index(b), "ref_")}
            for b in range(len(items))
        ]


def preprocess(cfg: DictConfig, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Fill the feature cache for ``cfg.data``; returns the metrics written to ``preprocess_metrics.json``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from consisid_lab.utils.run import seed_everything

    start = time.perf_counter()
    run_dir = Path(run_dir if run_dir is not None else cfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.get("torch_threads"):
        torch.set_num_threads(int(cfg.torch_threads))
    seed_everything(cfg.seed)

    datamodule = instantiate(cfg.data, skipped_path=str(run_dir / SKIPPED_FILE), feature_cache_dir=None)
    skip_log: SkipLog = datamodule.skip_log
    digest = datamodule.content_hash()
    folder = cache_folder(cfg.cache_dir, digest)
    writer = FeatureCacheWriter(folder, datamodule.content_config(), digest, shard_size=cfg.shard_size)
    if cfg.get("retry_failed", False):
        writer.forget_failed()
    splits = datamodule.entries()
    total = sum(len(v) for v in splits.values())
    remembered = [e for entries in splits.values() for e in entries if e.key in writer.failed]
    for e in remembered:  # failed before under this config: recorded for this run's summary, not decoded again
        row = writer.failed[e.key]
        detail = f"{row.get('detail', '')} (remembered from an earlier run; retry_failed=true tries again)".strip()
        skip_log.record(e.path, row["reason"], detail, key=e.key)
    jobs = [
        (split, i, e)
        for split, entries in splits.items()
        for i, e in enumerate(entries)
        if e.key not in writer.finished and e.key not in writer.failed
    ]
    already = sum(e.key in writer.finished for entries in splits.values() for e in entries)
    log.info(
        "feature cache %s: %d clips, %d already cached, %d failed before, %d to build",
        folder, total, already, len(remembered), len(jobs),
    )  # fmt: skip

    encoders = Encoders(cfg) if jobs else None
    loader = DataLoader(
        _ClipJobs(jobs, ClipBuilder(datamodule.sampling)),
        batch_size=None,
        num_workers=int(cfg.num_workers),
        collate_fn=_unbatched,
    )
    built, pending = 0, []

    def encode(pending: list[dict]) -> int:
        assert encoders is not None
        results = encoders([p["item"] for p in pending])
        n = 0
        for p, res in zip(pending, results):
            entry, item = p["entry"], p["item"]
            if isinstance(res, str):
                skip_log.record(entry.path, res, key=entry.key)
                writer.add_failed(entry.key, res)
                continue
            meta = {"split": p["split"], **{k: item[k] for k in ("caption", "identity", "clip_id", "key", "track_id")}}
            if "face_share" in item:
                meta["face_share"] = round(float(item["face_share"]), 4)
            writer.add(meta, {**item_to_tensors(item), **res})
            n += 1
        return n

    columns = (TextColumn("preprocess"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not cfg.get("progress", True)) as progress:
        task = progress.add_task("clips", total=len(jobs))
        for result in loader:
            if "error" in result:
                reason, detail = result["error"]
                skip_log.record(result["entry"].path, reason, detail, key=result["entry"].key)
                if not reason.startswith(UNEXPECTED_PREFIX):  # an unforeseen error may be passing: tried again
                    writer.add_failed(result["entry"].key, reason, detail)
            else:
                pending.append(result)
                if len(pending) >= cfg.encode_batch_size:
                    built += encode(pending)
                    pending = []
            progress.advance(task)
        if pending:
            built += encode(pending)
    writer.close()

    seconds = time.perf_counter() - start
    skipped = count_reasons(read_skipped(run_dir / SKIPPED_FILE))
    metrics = {
        "cache_dir": str(folder),
        "hash": digest,
        "clips_total": total,
        "clips_cached_before": already,
        "clips_failed_before": len(remembered),
        "clips_built": built,
        "clips_in_cache": len(writer.finished),
        "skipped": skipped,
        "skipped_total": sum(skipped.values()),
        "seconds": round(seconds, 3),
        "clips_per_s": round(built / seconds, 4) if seconds > 0 else None,
        "num_workers": int(cfg.num_workers),
    }
    (run_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2, sort_keys=True))
    log.info(
        "preprocessed %d clips in %.1f s (%d were cached); skipped %s -> %s",
        built,
        seconds,
        already,
        skipped or "none",
        run_dir / SKIPPED_FILE,
    )
    return metrics


@hydra.main(version_base="1.3", config_path="../conf", config_name="preprocess")
def main(cfg: DictConfig) -> None:
    log.debug("config:\n%s", OmegaConf.to_yaml(cfg))
    preprocess(cfg)


if __name__ == "__main__":
    main()
