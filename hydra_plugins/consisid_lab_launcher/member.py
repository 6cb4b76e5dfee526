"""One sweep member in its own process: ``python -m hydra_plugins.consisid_lab_launcher.member RUN_DIR``.

Started by ``IsolatedLauncher``, which left the pickled job (Hydra context, task function, the member's config)
in ``RUN_DIR``; the job's ``JobReturn`` is written back there. ``faulthandler`` writes the Python stacks of a
native crash to ``RUN_DIR/native_trace.log`` for the launcher to record.
"""

from __future__ import annotations

import faulthandler
import os
import sys
from pathlib import Path


def run(run_dir: Path) -> int:
    import cloudpickle
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.singleton import Singleton
    from hydra.core.utils import JobStatus, run_job, setup_globals

    from hydra_plugins.consisid_lab_launcher.isolated_launcher import NATIVE_TRACE_FILE, PAYLOAD_FILE, RESULT_FILE

    # Kept open for the life of the process: faulthandler writes to it from a signal handler.
    trace = open(run_dir / NATIVE_TRACE_FILE, "w")  # noqa: SIM115
    faulthandler.enable(file=trace, all_threads=True)
    hydra_context, task_function, sweep_config, singleton_state = cloudpickle.loads(
        (run_dir / PAYLOAD_FILE).read_bytes()
    )
    Singleton.set_state(singleton_state)
    setup_globals()
    HydraConfig.instance().set_config(sweep_config)
    ret = run_job(
        hydra_context=hydra_context,
        task_function=task_function,
        config=sweep_config,
        job_dir_key="hydra.sweep.dir",
        job_subdir_key="hydra.sweep.subdir",
    )
    try:
        data = cloudpickle.dumps(ret)
    except Exception as err:  # an unpicklable exception of a failed job: hand back its text
        if ret.status != JobStatus.FAILED:
            raise
        ret.return_value = RuntimeError(f"{ret._return_value!r} (not picklable: {err})")
        data = cloudpickle.dumps(ret)
    tmp = run_dir / f".{RESULT_FILE}.{os.getpid()}.tmp"
    tmp.write_bytes(data)
    os.replace(tmp, run_dir / RESULT_FILE)
    return 0


def run_forked(run_dir: str) -> None:
    """Target of a member forked from the launcher's fork server: its exit code is :func:`run`'s (multiprocessing
    flushes the standard streams on the way out)."""
    sys.exit(run(Path(run_dir)))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: python -m {__spec__.name if __spec__ else 'member'} RUN_DIR")
    sys.exit(run(Path(sys.argv[1])))
