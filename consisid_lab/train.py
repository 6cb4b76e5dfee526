"""Training task: `python -m consisid_lab.train [+experiment=NAME] [overrides]` (`-m` sweeps)."""

from __future__ import annotations

import logging
import time
from typing import Any

import hydra
from omegaconf import DictConfig

from consisid_lab.utils.checkpoints import resume_checkpoint
from consisid_lab.utils.instantiate import instantiate, to_container
from consisid_lab.utils.run import in_multirun, log_config, recorded_run, seed_everything
from consisid_lab.utils.strategies import check_strategy

log = logging.getLogger(__name__)


def check_weight_sources(cfg: DictConfig) -> None:
    """Resuming and starting from pretrained weights exclude each other: say which wins and how to get the other."""
    resume = cfg.get("ckpt_path")
    model = cfg.get("model") or {}
    pretrained = {
        "model.init_from": model.get("init_from"),
        "model.backbone.pretrained": (model.get("backbone") or {}).get("pretrained"),
    }
    given = {k: v for k, v in pretrained.items() if v}
    if resume and given:
        names = " and ".join(f"{k}={v}" for k, v in given.items())
        raise ValueError(
            f"ckpt_path={resume} and {names} are both set. ckpt_path wins when resuming (the run continues from its "
            f"weights, optimizer state and step, and the pretrained weights would be overwritten), so it is refused "
            f"rather than guessed: to resume, drop {' and '.join(f'{k}=null' for k in given)}; to start a new run "
            "from the pretrained weights, drop ckpt_path (ckpt_path=null)"
        )


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit and test one composition; returns the final metrics. Every outcome is written to metrics.json."""
    check_weight_sources(cfg)
    check_strategy(cfg.trainer)
    with recorded_run(cfg) as record:
        seed_everything(cfg.seed)
        ckpt_path = resume_checkpoint(cfg.get("ckpt_path"))
        datamodule = instantiate(cfg.data)
        model = instantiate(cfg.model)
        model.run_config = to_container(cfg)
        callbacks = instantiate(cfg.get("callbacks"))
        record.loggers = instantiate(cfg.get("logger")) or []
        trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=record.loggers)
        if ckpt_path is not None:
            record.resume_from(ckpt_path)  # before anything is logged: the CSV log keeps its earlier steps
        log_config(record.loggers, cfg)
        record.set_components(cfg)

        if cfg.get("train", True):
            start = time.perf_counter()
            trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
            record.train_time_s = time.perf_counter() - start
        if cfg.get("test", True):
            trainer.test(model, datamodule=datamodule, ckpt_path=None)
        record.finish(trainer.callback_metrics, model.stability)
        return record.metrics


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        metrics = train(cfg)
    except Exception:
        if in_multirun():
            # One failing sweep member must not stop the others; its metrics.json records the error.
            log.exception("run failed; continuing the sweep")
            return None
        raise
    value = metrics.get(cfg.get("optimized_metric"))
    return float(value) if value is not None else None


if __name__ == "__main__":
    main()
