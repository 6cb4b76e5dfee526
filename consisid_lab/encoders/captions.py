"""Attribute captions of synthetic identities, the text side of the tiny CLIP's training pairs.

A caption names each identity attribute in words: scalar parameters are binned into tertiles of a population
of identities ("narrow / medium / wide face width"), colours by lightness and dominant hue ("dark reddish hair
colour"), and per-identity lists (marks, freckles) by their count. Tertiles come from the population being
captioned so every word is about equally frequent and the contrastive task is balanced.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields, is_dataclass

import numpy as np

TERTILE_WORDS = ("low", "medium", "high")

# Friendlier words for attribute names that read naturally with a size adjective.
SIZE_WORDS = {
    "width": ("narrow", "medium", "wide"),
    "spacing": ("close", "medium", "wide"),
    "length": ("short", "medium", "long"),
    "height": ("low", "medium", "high"),
    "size": ("small", "medium", "large"),
}
LIGHTNESS_WORDS = ("dark", "medium", "light")
HUE_WORDS = ("reddish", "yellowish", "greenish", "cyan", "bluish", "purplish")


def _attributes(identity) -> dict[str, object]:
    if isinstance(identity, Mapping):
        items = list(identity.items())
    elif is_dataclass(identity):
        items = [(f.name, getattr(identity, f.name)) for f in fields(identity)]
    else:
        raise ValueError(
            f"attribute captions need a dataclass or mapping of attributes, got {type(identity).__name__}"
        )
    out: dict[str, object] = {}
    for name, value in items:
        if is_dataclass(value):
            out.update({f"{name} {k}": v for k, v in _attributes(value).items()})
        else:
            out[name] = value
    return out


def _kind(value: object) -> str | None:
    if isinstance(value, bool):
        return "flag"
    if isinstance(value, (int, float, np.integer, np.floating)):
        return "scalar"
    arr = np.asarray(value) if isinstance(value, (list, tuple, np.ndarray)) else None
    if arr is None or arr.dtype.kind not in "fiub":
        return None
    if arr.shape == (3,) and np.all((arr >= 0) & (arr <= 1)):
        return "colour"
    if arr.ndim >= 1:
        return "count"
    return "scalar"


def _hue_word(rgb: np.ndarray) -> str:
    r, g, b = (float(c) for c in rgb)
    hi, lo = max(r, g, b), min(r, g, b)
    if hi - lo < 0.08:
        return "grey"
    if hi == r:
        h = ((g - b) / (hi - lo)) % 6
    elif hi == g:
        h = (b - r) / (hi - lo) + 2
    else:
        h = (r - g) / (hi - lo) + 4
    return HUE_WORDS[int(h) % 6]


def _words_for(name: str) -> tuple[str, str, str]:
    for key, words in SIZE_WORDS.items():
        if name.endswith(key):
            return words
    return TERTILE_WORDS


class AttributeCaptioner:
    """Captions identities using tertile thresholds of a population of identities."""

    def __init__(self, population: list) -> None:
        if not population:
            raise ValueError("AttributeCaptioner needs a non-empty population of identities to set its bins")
        attrs = [_attributes(p) for p in population]
        self.kinds = {name: _kind(value) for name, value in attrs[0].items()}
        self.edges: dict[str, np.ndarray] = {}
        for name, kind in self.kinds.items():
            if kind in ("scalar", "colour", "count"):
                values = np.array([self._scalar(a[name], kind) for a in attrs], dtype=np.float64)
                self.edges[name] = np.quantile(values, [1 / 3, 2 / 3])

    @staticmethod
    def _scalar(value: object, kind: str | None) -> float:
        if kind == "colour":
            return float(np.mean(np.asarray(value, dtype=np.float64)))  # lightness
        if kind == "count":
            return float(np.asarray(value).shape[0])
        return float(value)

    def __call__(self, identity) -> str:
        parts = []
        for name, value in _attributes(identity).items():
            kind = self.kinds.get(name)
            label = name.replace("_", " ")
            if kind == "flag":
                parts.append(f"{'with' if value else 'without'} {label}")
            elif name in self.edges:
                b = int(np.searchsorted(self.edges[name], self._scalar(value, kind), side="right"))
                if kind == "colour":
                    parts.append(f"{LIGHTNESS_WORDS[b]} {_hue_word(np.asarray(value))} {label}")
                elif kind == "count":
                    parts.append(f"{('few', 'some', 'many')[b]} {label}")
                else:
                    parts.append(f"{_words_for(name)[b]} {label}")
        return "a face with " + ", ".join(parts)


def _benchmark_extras(identity) -> dict[str, object]:
    """Attributes of a benchmark identity that ``describe_identity`` leaves out (layout and marks)."""
    low, high = identity.low, identity.high
    return {
        "jaw taper": low.jaw,
        "nose length": low.nose_y,
        "eye height": -low.eye_y,
        "mouth height": low.mouth_y,
        "hair volume": low.hair_w + low.hair_top,
        "moles": list(high.moles),
    }


def attribute_captions(identities: list) -> list[str]:
    """Captions of ``identities``, binned against their own population.

    Benchmark identities (``consisid_lab.data.synthetic.IdentityParams``) get the generator's own description
    (face shape, skin tone, hair, eye spacing, mouth size) plus tertile words for the layout and the number of
    moles; any other dataclass is described field by field.
    """
    if identities and hasattr(identities[0], "low") and hasattr(identities[0], "high"):
        from consisid_lab.data.synthetic import describe_identity

        extras = AttributeCaptioner([_benchmark_extras(p) for p in identities])
        return [
            f"{describe_identity(p)}; {extras(_benchmark_extras(p)).removeprefix('a face with ')}" for p in identities
        ]
    captioner = AttributeCaptioner(identities)
    return [captioner(p) for p in identities]
