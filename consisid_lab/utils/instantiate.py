"""The one place the project turns Hydra configs into objects."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf


def instantiate(cfg: Any, /, **kwargs: Any) -> Any:
    """Instantiate a ``_target_`` config (recursively), or return ``None`` for an empty/``None`` config.

    Lists and dicts of configs (e.g. callbacks, loggers) come back as lists of objects, entries without a
    ``_target_`` are skipped, so a group can be disabled by setting it to ``null``.
    """
    import hydra.utils
    from hydra.errors import InstantiationException

    if cfg is None:
        return None
    if isinstance(cfg, (DictConfig, dict)) and "_target_" in cfg:
        try:
            return hydra.utils.instantiate(cfg, _convert_="partial", **kwargs)
        except InstantiationException as err:
            # Configuration errors raised by our constructors (ValueError naming the setting and the fix,
            # FileNotFoundError naming the path) reach the user as themselves, not wrapped by Hydra.
            cause = err.__cause__
            if isinstance(cause, (ValueError, FileNotFoundError, KeyError)):
                raise cause.with_traceback(cause.__traceback__) from None
            unexpected = _unexpected_keyword(cause)
            if unexpected is not None:
                # A key another variant of the group takes (set by a preset or an experiment) reached this one.
                raise ValueError(
                    f"{cfg['_target_']} takes no setting {unexpected!r}, but the composed config sets it (from a "
                    "preset such as model=consisid_preview or an +experiment written for another variant of this "
                    f"group); remove it with ~<group path>.{unexpected} on the command line, or pick the variant "
                    "that has it"
                ) from cause
            raise
    if isinstance(cfg, (DictConfig, dict)):
        return [instantiate(v) for v in cfg.values() if isinstance(v, (DictConfig, dict)) and "_target_" in v]
    if isinstance(cfg, (ListConfig, list)):
        return [instantiate(v) for v in cfg if v is not None]
    raise TypeError(f"cannot instantiate {type(cfg).__name__}: expected a config with `_target_`, got {cfg!r}")


def _unexpected_keyword(err: BaseException | None) -> str | None:
    import re

    if not isinstance(err, TypeError):
        return None
    m = re.search(r"unexpected keyword argument '([^']+)'", str(err))
    return m.group(1) if m else None


def to_container(cfg: Any) -> Any:
    """Plain python containers (what checkpoints store: torch>=2.6 loads with weights_only=True)."""
    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg
