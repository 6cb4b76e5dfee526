"""``skipped.jsonl``: one JSON object per unusable item (path, reason), so a long run never dies on one bad sample.

Each line is written with a single ``write`` on a file opened in append mode, so DataLoader workers and
preprocessing workers can share one file. Counts per reason are kept in memory for the logs and metrics, and
:func:`read_skipped` recounts from the file (the one place that sees every worker's records).
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from pathlib import Path

logger = logging.getLogger(__name__)

SKIPPED_FILE = "skipped.jsonl"


class SkipLog:
    """Record unusable items; ``path=None`` keeps the records in memory only."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.counts: Counter[str] = Counter()
        self._seen: set[tuple[str, str]] = set()

    def record(self, item: str | Path, reason: str, detail: str = "", **extra) -> None:
        """Log ``item`` as skipped for ``reason`` (once per item and reason in this process)."""
        key = (str(item), reason)
        if key in self._seen:
            return
        self._seen.add(key)
        self.counts[reason] += 1
        logger.warning("skipped %s: %s%s", item, reason, f" ({detail})" if detail else "")
        if self.path is None:
            return
        row = {"path": str(item), "reason": reason, **({"detail": detail} if detail else {}), **extra}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = (json.dumps(row, sort_keys=True) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)


def read_skipped(path: str | Path) -> list[dict]:
    """All records of a ``skipped.jsonl`` (an absent file holds none)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def count_reasons(records: list[dict]) -> dict[str, int]:
    """Records per reason, counting each (path, reason) once."""
    return dict(Counter(reason for _, reason in {(r["path"], r["reason"]) for r in records}))
