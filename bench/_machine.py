"""What every benchmark output names: the CPU model (ratios differ between machines of one kind)."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what ``platform`` knows, else "unknown"."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine(threads: int | None = None) -> dict:
    """What a benchmark's output records about where it ran: CPU model, cores, torch version, torch threads
    (``threads`` when the timed work runs elsewhere, e.g. in child processes), load average and time (UTC)."""
    import os
    import time

    import torch

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads() if threads is None else threads, "loadavg": os.getloadavg(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def machine_line(env: dict) -> str:
    """One line naming the machine of :func:`machine`, for a results table's header."""
    return (f"{env['cpu']}, {env['cores']} cores, torch {env['torch']}, {env['threads']} thread(s), "
            f"load average {env['loadavg'][0]:.1f} at the start of the write, {env['date']}")
