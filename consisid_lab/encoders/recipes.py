"""Stand-in training recipes by name, as configs select them (`standins_recipe=default|tiny`)."""

from __future__ import annotations


def named_recipe(name: str):
    """``default``: the benchmark's recipe; ``tiny``: seconds-long, for tests (right interfaces, weak networks)."""
    from consisid_lab.encoders.training import Recipe

    if name == "default":
        return Recipe()
    if name == "tiny":
        return Recipe.tiny()
    raise ValueError(f"standins_recipe must be 'default' or 'tiny', got {name!r}")
