"""consisid_lab's Hydra launcher: every sweep member in its own process (``hydra/launcher=isolated``)."""
