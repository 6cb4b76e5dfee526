"""Stand-in training recipes by name, as configs select them (`standins_recipe=default|tiny`)."""

from __future__ import annotations


def named_recipe(name: str, kind: type | None = None):
    """``default``: the benchmark's recipe; ``tiny``: seconds-long, for tests (right interfaces, weak networks).

    ``kind``: the recipe class (``Recipe`` for the encoders and evaluators, ``CodecRecipe``, ``GateRecipe``); each
    has a default constructor and a ``tiny()`` one.
    """
    if kind is None:
        from consisid_lab.encoders.training import Recipe as kind
    if name == "default":
        return kind()
    if name == "tiny":
        return kind.tiny()
    raise ValueError(f"standins_recipe must be 'default' or 'tiny', got {name!r}")
