"""Lightning callbacks configured from ``conf/callbacks/``."""

from consisid_lab.callbacks.frequency import FrequencyAnalysisCallback

__all__ = ["FrequencyAnalysisCallback"]
