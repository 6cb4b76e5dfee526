"""consisid_lab: frequency-ablation research on identity-preserving text-to-video generation."""

__version__ = "0.1.0"

from consisid_lab.utils.resolvers import register as _register_resolvers

_register_resolvers()
