"""What every task does around the loop: seeding, checkpoint resolution, metrics.json, logger shutdown."""

from __future__ import annotations

import json
import logging
import os
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

COMPONENT_GROUPS = (
    "backbone",
    "vae",
    "text_encoder",
    "keypoint_renderer",
    "global_encoder",
    "local_encoder",
    "fuser",
    "injector",
)


def seed_everything(seed: int) -> None:
    import lightning.pytorch as pl

    pl.seed_everything(int(seed), workers=True, verbose=False)


def output_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path.cwd()


def in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


CHECKPOINT_DIR = "checkpoints"  # where a run's ModelCheckpoint writes (conf/callbacks/default.yaml)
LAST_CHECKPOINT = "last.ckpt"


def resolve_ckpt_path(path: str | Path | None) -> str | None:
    """The checkpoint file that ``ckpt_path=...`` means, for every task (train, eval, generate, export).

    ``path`` is a ``.ckpt`` file, a run directory (its ``checkpoints/last.ckpt``) or a run's ``checkpoints``
    directory (its ``last.ckpt``); ``None`` / ``""`` / ``"null"`` mean no checkpoint. Anything else raises
    ``FileNotFoundError`` naming the path, the checkpoints found there (if any) and what to pass instead.
    """
    if path is None or str(path) in ("", "null", "None"):
        return None
    p = Path(str(path)).expanduser()
    if p.is_file():
        return str(p)
    if not p.exists():
        raise FileNotFoundError(
            f"ckpt_path={path} does not exist; pass a run directory (outputs/<experiment>/<time>) or a .ckpt file"
        )
    for candidate in (p / CHECKPOINT_DIR / LAST_CHECKPOINT, p / LAST_CHECKPOINT):
        if candidate.is_file():
            return str(candidate)
    found = sorted(p.glob("*.ckpt")) + sorted((p / CHECKPOINT_DIR).glob("*.ckpt"))
    if found:
        listed = ", ".join(str(f) for f in found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
        hint = f"it holds {listed}: pass one of them as ckpt_path=<file>"
    else:
        hint = (
            "it holds no .ckpt file at all; pass the output directory of a training run that saved one "
            f"(outputs/<experiment>/<time>, with {CHECKPOINT_DIR}/{LAST_CHECKPOINT}) or a .ckpt file"
        )
    raise FileNotFoundError(f"ckpt_path={path} is a directory without {CHECKPOINT_DIR}/{LAST_CHECKPOINT}; {hint}")


def component_names(cfg: DictConfig) -> dict[str, str]:
    """The chosen variant of each component group, read from Hydra's choices (``model/fuser: perceiver``)."""
    from hydra.core.hydra_config import HydraConfig

    names: dict[str, str] = {}
    if HydraConfig.initialized():
        choices = HydraConfig.get().runtime.choices
        for group in COMPONENT_GROUPS:
            choice = choices.get(f"model/{group}")
            if choice is not None:
                names[group] = str(choice)
    model = cfg.get("model") or {}
    if "injector" in model and model.injector.get("position"):
        names["injector_position"] = str(model.injector.position)
    if "local_encoder" in model and model.local_encoder.get("arcface_layer") and model.local_encoder.get("arcface"):
        names["arcface_layer"] = str(model.local_encoder.arcface_layer)
    if "global_encoder" in model and "use_kps" in model.global_encoder:
        names["use_kps"] = str(bool(model.global_encoder.use_kps)).lower()
    return names


@dataclass
class RunRecord:
    """``metrics.json`` of a run: written at start (running), at the end (completed) or on failure (failed)."""

    path: Path
    experiment: str
    seed: int
    started: float
    components: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    stability: dict[str, float] = field(default_factory=dict)
    train_time_s: float | None = None
    loggers: list = field(default_factory=list)  # closed when the run ends, whatever happens

    @classmethod
    def start(cls, cfg: DictConfig) -> RunRecord:
        out = output_dir()
        out.mkdir(parents=True, exist_ok=True)
        rec = cls(
            path=out / "metrics.json",
            experiment=str(cfg.get("experiment_name")),
            seed=int(cfg.get("seed", 0)),
            started=time.time(),
        )
        OmegaConf.save(cfg, out / "config_resolved.yaml", resolve=True)
        rec.write("running")
        return rec

    def set_components(self, cfg: DictConfig) -> None:
        self.components = component_names(cfg)

    def finish(self, callback_metrics: dict[str, Any], stability: dict[str, float]) -> None:
        self.metrics = {k: float(v) for k, v in callback_metrics.items() if _is_scalar(v)}
        self.stability = dict(stability)
        self.write("completed")

    def fail(self, err: BaseException) -> None:
        self.write("failed", error=f"{type(err).__name__}: {err}", trace=traceback.format_exc())

    def write(self, status: str, error: str | None = None, trace: str | None = None) -> None:
        data = {
            "experiment": self.experiment,
            "seed": self.seed,
            "status": status,
            "error": error,
            "wall_time_s": time.time() - self.started,
            "train_time_s": self.train_time_s,
            "metrics": self.metrics,
            "stability": self.stability,
            "components": self.components,
        }
        if trace:
            data["traceback"] = trace
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
        os.replace(tmp, self.path)


def _is_scalar(v: Any) -> bool:
    if hasattr(v, "numel"):
        return v.numel() == 1
    return isinstance(v, (int, float))


@contextmanager
def recorded_run(cfg: DictConfig) -> Iterator[RunRecord]:
    """The run's ``metrics.json`` for its whole life: ``running`` at start, ``failed`` with the error on any
    exception (re-raised); the loggers put on the record are always closed."""
    record = RunRecord.start(cfg)
    try:
        yield record
    except BaseException as err:
        record.fail(err)
        raise
    finally:
        close_loggers(record.loggers)


def log_config(loggers: list, cfg: DictConfig) -> None:
    params = OmegaConf.to_container(cfg, resolve=True)
    for lg in loggers:
        lg.log_hyperparams(params)


def close_loggers(loggers: list) -> None:
    """Always close W&B (also on failure) so offline files are complete and no service process lingers."""
    for lg in loggers:
        if type(lg).__name__ == "WandbLogger":
            import wandb

            if wandb.run is not None:
                wandb.finish()
