"""Logging filters the task configs install (``conf/hydra/default.yaml``)."""

from __future__ import annotations

import logging
import os

# open_clip's "No pretrained weights loaded" is printed before a stand-in's own weights are loaded into the model.
MISLEADING_WARNINGS = ("No pretrained weights loaded",)


class ThirdPartyInfoFilter(logging.Filter):
    """Drop records below WARNING emitted from inside the named packages, and known-misleading warnings.

    open_clip logs its model-config parsing on the root logger at INFO each time a stand-in CLIP is built, so
    filtering by logger name cannot catch it; the emitting file's path can. ``drop_warnings``: message prefixes of
    warnings from those packages that do not apply here (by default :data:`MISLEADING_WARNINGS`).
    """

    def __init__(
        self,
        packages: list[str] | tuple[str, ...] = ("open_clip",),
        drop_warnings: list[str] | tuple[str, ...] = MISLEADING_WARNINGS,
    ) -> None:
        super().__init__()
        self.markers = tuple(f"{os.sep}{p}{os.sep}" for p in packages)
        self.drop_warnings = tuple(drop_warnings)

    def filter(self, record: logging.LogRecord) -> bool:
        if not any(m in record.pathname for m in self.markers):
            return True
        if record.levelno < logging.WARNING:
            return False
        # A record re-emitted by the parent of a stand-in build worker carries its message without the "worker N: "
        # prefix as well.
        message = getattr(record, "unprefixed_message", None) or record.getMessage()
        return not (record.levelno == logging.WARNING and message.startswith(self.drop_warnings))
