"""This process's memory as the operating system sees it: what measured memory claims rest on."""

from __future__ import annotations

import ctypes
import gc
import os
import sys
from pathlib import Path
from typing import Any

import torch


def libc() -> Any | None:
    """glibc, where it has `malloc_trim`; None elsewhere."""
    try:
        libc = ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else None
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") else None


def release_freed_memory(device: torch.device) -> None:
    """Return freed memory to the OS, so that RSS counts live allocations only (glibc keeps freed heap pages)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif (glibc := libc()) is not None:
        glibc.malloc_trim(0)


def rss_bytes() -> int | None:
    """Resident set size of this process: psutil if installed, else /proc/self/statm; None if neither works."""
    try:
        import psutil
    except ImportError:
        statm = Path("/proc/self/statm")
        return int(statm.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") if statm.is_file() else None
    return int(psutil.Process().memory_info().rss)
