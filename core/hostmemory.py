"""Host memory of this process, shared by every backend: RSS from /proc (Linux) with a
resource-module fallback, page-out of file-backed ranges, heap trimming."""

from __future__ import annotations

import ctypes
import resource
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def proc_kb(field: str, path: str = "/proc/self/status") -> float | None:
    """The ``FIELD:  N kB`` value of a /proc file (Linux), else None."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return None
    return next((float(line.split()[1]) for line in lines if line.startswith(field + ":")), None)


def rss_mb() -> float:
    kb = proc_kb("VmRSS")
    return peak_rss_mb() if kb is None else kb / 1024


def peak_rss_mb() -> float:
    kb = proc_kb("VmHWM")
    if kb is not None:
        return kb / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc's malloc_trim; a no-op elsewhere):
    methods with many MB-sized temporaries (GPTQ's solver) fragment glibc's heap (on SmolLM2
    the resident set grew by up to ~0.5 GB over RTN's without a trim per layer)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


_MADV_PAGEOUT = 21  # Linux >= 5.4: reclaim these pages now (file pages are just dropped)


def _file_mappings() -> list[tuple[int, int]]:
    """(start, end) of this process's file-backed mappings, from /proc/self/maps."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        # address perms offset dev inode [path]; inode 0 = anonymous, "[heap]" etc. special
        if len(fields) == 6 and fields[4] != "0" and not fields[5].startswith("["):
            start, end = (int(a, 16) for a in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


def file_backed_bytes(ranges: Iterable[tuple[int, int]]) -> int:
    """How many bytes of these (address, bytes) ranges lie in file mappings (0 off Linux)."""
    if not sys.platform.startswith("linux"):
        return 0
    maps = _file_mappings()
    return sum(max(0, min(lo + size, end) - max(lo, start))
               for lo, size in ranges for start, end in maps)


def page_out_file_backed(ranges: list[tuple[int, int]]) -> int:
    """Drop the resident pages of these (address, bytes) ranges that lie in a file mapping
    (re-read from the file if touched again: contents never change; anonymous memory is left
    alone); returns the bytes advised. docs/architecture.md, "Memory", says why."""
    if not sys.platform.startswith("linux") or not ranges:
        return 0
    try:
        maps = _file_mappings()
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return 0
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    page = resource.getpagesize()
    advised = 0
    for lo, size in ranges:
        for start, end in maps:
            a = (max(lo, start) + page - 1) // page * page  # whole pages inside the range
            b = min(lo + size, end) // page * page
            if b > a and libc.madvise(a, b - a, _MADV_PAGEOUT) == 0:
                advised += b - a
    return advised


def module_ranges(module: Any) -> set[tuple[int, int]]:
    """(address, bytes) of the host-memory storages (whole) of a module's tensors."""
    ranges = set()
    for t in [*module.parameters(), *module.buffers()]:
        if t.device.type == "cpu" and t.numel():
            storage = t.untyped_storage()
            ranges.add((storage.data_ptr(), storage.nbytes()))
    return ranges


def page_out_view(view: Any) -> int:
    """:func:`page_out_file_backed` for the bytes of one tensor view only (a chunk of a
    mapped tensor being read), not its whole storage."""
    return page_out_file_backed([(view.data_ptr(), view.numel() * view.element_size())])
