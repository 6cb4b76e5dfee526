"""consisid_lab: frequency-ablation research on identity-preserving text-to-video generation."""

__version__ = "0.1.0"
