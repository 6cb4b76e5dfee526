"""OmegaConf resolvers of the project's configs, registered when ``consisid_lab`` is imported."""

from __future__ import annotations

from omegaconf import OmegaConf


def base_dir(value: str | None) -> str:
    """``${base_dir_of:${base_dir}}``: the base backbone directory that ``+experiment=from_base`` fine-tunes from.

    ``base_dir`` is null unless set; a fine-tune without one would silently train from scratch, so it is refused.
    """
    if value is None or str(value).strip() in ("", "???"):
        raise ValueError(
            "+experiment=from_base needs base_dir=DIR, a base backbone written by "
            "`python -m consisid_lab.export ckpt_path=RUN out_dir=DIR layout=backbone` (README, 'A base backbone "
            "to fine-tune from')"
        )
    return str(value)


def register() -> None:
    if not OmegaConf.has_resolver("base_dir_of"):
        OmegaConf.register_new_resolver("base_dir_of", base_dir)
