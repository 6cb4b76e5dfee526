"""Logger factories used from `conf/logger/`."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def wandb_has_credentials() -> bool:
    """True when an API key is configured (environment or ~/.netrc); no network call is made."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def wandb_logger(
    project: str,
    save_dir: str,
    group: str | None = None,
    job_type: str | None = None,
    name: str | None = None,
    tags: list[str] | None = None,
    mode: str = "auto",
    **kwargs: Any,
):
    """A Lightning ``WandbLogger`` that runs offline unless credentials exist (``mode='auto'``).

    ``mode`` may also be ``online``, ``offline`` or ``disabled``; ``WANDB_MODE`` in the environment wins.
    Offline runs write ``<save_dir>/wandb/offline-run-*`` (sync later with ``wandb sync``).
    """
    from lightning.pytorch.loggers import WandbLogger

    if mode not in ("auto", "online", "offline", "disabled"):
        raise ValueError(f"logger.wandb.mode must be auto|online|offline|disabled, got {mode!r}")
    resolved = os.environ.get("WANDB_MODE") or (
        ("online" if wandb_has_credentials() else "offline") if mode == "auto" else mode
    )
    if resolved == "offline" and mode == "auto":
        log.info("no W&B API key found: logging offline under %s/wandb (sync later with `wandb sync`)", save_dir)
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    return WandbLogger(
        project=project,
        save_dir=save_dir,
        group=group,
        job_type=job_type,
        name=name or group,
        tags=list(tags or []),
        offline=resolved == "offline",
        mode=resolved,
        **kwargs,
    )
