"""The CPUs this process may run on. No torch import: the kernels' compile-ahead helper, which
starts without the normdrop package, uses it too."""

from __future__ import annotations

import os

__all__ = ["usable_cpus"]


def usable_cpus() -> int:
    """The CPUs in this process's affinity mask (Linux), else the machine's CPUs."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
