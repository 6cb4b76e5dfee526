"""Evaluation task: `python -m consisid_lab.eval ckpt_path=RUN_DIR_OR_CKPT` (test split, benchmark metrics)."""

from __future__ import annotations

import logging
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from consisid_lab.utils.instantiate import instantiate
from consisid_lab.utils.run import recorded_run, resolve_ckpt_path, seed_everything

log = logging.getLogger(__name__)


def load_module(ckpt_path: str, use_ema: bool = True):
    """Rebuild the trained composition from the config stored in the checkpoint and load its weights strictly.

    With ``use_ema`` the EMA weights saved by ``TrainableEMA`` replace the trainable parameters (what validation
    and test saw during training).
    """
    from consisid_lab.models.lit_module import IdentityVideoModule, migrate_checkpoint
    from consisid_lab.utils.checkpoints import load_checkpoint, localised_config

    # The weights come from the checkpoint: the pretrained directory the run started from is not read again
    # (it need not exist where the checkpoint is used). Cache paths are stored portably and resolve to this
    # machine's cache.
    ckpt = load_checkpoint(ckpt_path)
    hparams = localised_config(dict(ckpt.get("hyper_parameters") or {}))
    overrides: dict[str, Any] = {**hparams, "init_from": None}
    if (hparams.get("backbone") or {}).get("pretrained"):
        overrides["backbone"] = {**hparams["backbone"], "pretrained": None}
    module = IdentityVideoModule.load_from_checkpoint(
        ckpt_path, map_location="cpu", strict=True, weights_only=True, **overrides
    )
    if use_ema:
        migrate_checkpoint(ckpt)
        states = [v for k, v in (ckpt.get("callbacks") or {}).items() if k.startswith("TrainableEMA")]
        if states:
            params = dict(module.named_parameters())
            with torch.no_grad():
                for name, value in states[0]["shadow"].items():
                    params[name].copy_(value)
            log.info("evaluating the EMA weights of %d parameters", len(states[0]["shadow"]))
        else:
            log.warning("%s holds no EMA state; evaluating the raw weights", ckpt_path)
    return module


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    with recorded_run(cfg) as record:
        seed_everything(cfg.seed)
        ckpt_path = resolve_ckpt_path(cfg.ckpt_path)
        model = load_module(ckpt_path, use_ema=cfg.get("use_ema", True))
        data_cfg = cfg.data
        stored = model.run_config or {}
        if cfg.get("data_from_checkpoint", True) and "data" in stored:
            data_cfg = OmegaConf.create(stored["data"])
            log.info("evaluating on the data config stored in %s", ckpt_path)
        record.experiment = str(stored.get("experiment_name", record.experiment))
        datamodule = instantiate(data_cfg)
        if model.benchmark_metrics is None and cfg.get("metrics") is not None:
            model.metrics_cfg = OmegaConf.to_container(cfg.metrics, resolve=True)
        record.loggers = instantiate(cfg.get("logger")) or []
        trainer = instantiate(cfg.trainer, logger=record.loggers, callbacks=[])
        with torch.no_grad():
            trainer.test(model, datamodule=datamodule)
        record.finish(trainer.callback_metrics, model.stability)
        return record.metrics


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
