"""Helpers referenced from trainer configs."""

from __future__ import annotations


def dit_block_classes() -> set[type]:
    """Module classes FSDP wraps one by one: the DiT blocks (each also the unit of activation checkpointing)."""
    from diffusers.models.transformers.cogvideox_transformer_3d import CogVideoXBlock

    return {CogVideoXBlock}
