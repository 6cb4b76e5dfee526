"""Declared comparisons of a study and their verdicts.

A claims file (``experiments/<study>/claims.yaml``) lists what the study sets out to test, before it is run::

    claims:
      - claim: the low-frequency route makes identity converge faster (Finding 1)
        treatment: full
        control: no_global
        metric: val_identity_gap_auc
        direction: higher          # higher | lower: the side of control the claim puts treatment on

``treatment`` and ``control`` name report rows (the experiment, plus ``[overrides]`` when the sweep varies
component overrides, exactly as the report's ``row`` column prints them); ``metric`` names a report column
(``facesim``, ``fid``, ``max_grad_norm``, ``val_identity_gap_auc``, ...). A top-level list (without ``claims:``)
is read the same way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from consisid_lab.analysis.stats import DIRECTIONS, PairedDifference, paired_difference, verdict

CLAIM_FIELDS = ("claim", "treatment", "control", "metric", "direction")


class ClaimsError(ValueError):
    """A claims file that cannot be evaluated; the message names the entry, the bad value and what exists."""


@dataclass(frozen=True)
class Claim:
    claim: str
    treatment: str
    control: str
    metric: str
    direction: str  # higher | lower


@dataclass(frozen=True)
class ClaimResult:
    claim: Claim
    difference: PairedDifference
    verdict: str  # supported | contradicted | inconclusive


def parse_claims(data: Any, source: str = "claims") -> list[Claim]:
    """Claims from a loaded yaml document (``{claims: [...]}`` or a list); every entry needs every field."""
    entries = data.get("claims") if isinstance(data, Mapping) else data
    if not isinstance(entries, list) or not entries:
        raise ClaimsError(
            f"{source}: expected a non-empty list of claims (or `claims:` holding one), got {type(entries).__name__}"
            f"; each entry has the fields {', '.join(CLAIM_FIELDS)}"
        )
    claims = []
    for i, entry in enumerate(entries):
        where = f"{source}: claim #{i + 1}"
        if not isinstance(entry, Mapping):
            raise ClaimsError(f"{where} is a {type(entry).__name__}, expected a mapping of {', '.join(CLAIM_FIELDS)}")
        missing = [f for f in CLAIM_FIELDS if entry.get(f) in (None, "")]
        unknown = sorted(set(map(str, entry)) - set(CLAIM_FIELDS))
        if missing or unknown:
            problems = ([f"missing {', '.join(missing)}"] if missing else []) + (
                [f"unknown field(s) {', '.join(unknown)}"] if unknown else []
            )
            raise ClaimsError(f"{where} ({entry.get('claim', '?')!r}): {'; '.join(problems)}; fields: {CLAIM_FIELDS}")
        direction = str(entry["direction"])
        if direction not in DIRECTIONS:
            raise ClaimsError(
                f"{where} ({entry['claim']!r}): direction must be one of {DIRECTIONS}, got {direction!r}"
            )
        claims.append(Claim(*(str(entry[f]) for f in CLAIM_FIELDS)))
    return claims


def load_claims(path: Path) -> list[Claim]:
    import yaml

    if not path.is_file():
        raise ClaimsError(f"claims file {path} does not exist; see consisid_lab/analysis/claims.py for the format")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ClaimsError(f"claims file {path} is not valid yaml: {exc}") from exc
    return parse_claims(data, str(path))


def _listed(names: Sequence[str]) -> str:
    return ", ".join(repr(n) for n in names) if names else "(none)"


def evaluate_claims(
    claims: Sequence[Claim], values: Mapping[str, Mapping[int, Mapping[str, float]]]
) -> list[ClaimResult]:
    """Verdict of every claim; ``values`` maps row label -> seed -> metric column -> value (completed runs).

    A claim naming a row or a metric that no run has raises ``ClaimsError`` listing what exists; a pair of rows
    whose seeds differ raises ``UnpairedSeedsError`` (a ``ValueError``) naming the missing seeds.
    """
    metrics = sorted({m for seeds in values.values() for v in seeds.values() for m in v})
    results = []
    for c in claims:
        for role, row in (("treatment", c.treatment), ("control", c.control)):
            if row not in values:
                raise ClaimsError(
                    f"claim {c.claim!r}: {role} {row!r} is no row of this sweep; rows: {_listed(list(values))}"
                )
        if c.metric not in metrics:
            raise ClaimsError(f"claim {c.claim!r}: metric {c.metric!r} is in no run; metrics: {_listed(metrics)}")
        sides = []
        for row in (c.treatment, c.control):
            per_seed = {s: v[c.metric] for s, v in values[row].items() if c.metric in v}
            if not per_seed:
                have = sorted({m for v in values[row].values() for m in v})
                raise ClaimsError(
                    f"claim {c.claim!r}: no completed run of {row!r} reports {c.metric!r}; it reports {_listed(have)}"
                )
            sides.append(per_seed)
        diff = paired_difference(*sides, treatment_name=repr(c.treatment), control_name=repr(c.control))
        results.append(ClaimResult(c, diff, verdict(diff.ci_low, diff.ci_high, c.direction)))
    return results
