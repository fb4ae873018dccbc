"""Memory the machine can give us, and a clear refusal when a job would not fit (instead of the OOM killer)."""

import os
from pathlib import Path

from .errors import LtudaError, human_bytes


def _cgroup_room():
    """Bytes this container may still take (cgroup v2 / v1 limit minus usage), None when unlimited/unknown."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit == "max" or not limit.isdigit() or int(limit) >= 2**60:
            return None
        return max(0, int(limit) - usage)
    return None


def available_bytes():
    """Memory available to a new allocation without swapping (Linux: MemAvailable, and the cgroup's
    room), None where unknown (then nothing is refused)."""
    room = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                room = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        room = None
    if room is None and hasattr(os, "sysconf"):
        try:
            room = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            room = None
    cgroup = _cgroup_room()
    if cgroup is not None:
        room = cgroup if room is None else min(room, cgroup)
    return room


def check_fits(needed: int, what: str, path=None, fix: str = "") -> None:
    """Raise one clear message when `needed` bytes are more than the memory available now."""
    room = available_bytes()
    if room is not None and needed > room:
        raise LtudaError(f"{what} needs about {human_bytes(needed)} of memory, but only {human_bytes(room)} "
                         f"is available", path,
                         fix or "Close other programs, or use a machine with more memory.")
