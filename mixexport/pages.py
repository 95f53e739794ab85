"""Hand memory-mapped weight pages back to the kernel.

A checkpoint of 1 GiB or more is loaded with ``torch.load(mmap=True)``: its tensors are views of a
private file mapping. Every page a lookup touches stays resident, and counts in the process's RSS,
until the kernel needs the memory. A 4 GB table read row by row (the table writer) or at random
(the eager reference scoring a few thousand ids, with the kernel's read-ahead and fault-around
mapping neighbours of each row) would otherwise end up resident. ``madvise(MADV_PAGEOUT)`` reclaims
such pages: clean file pages are simply re-read on the next access, so no data is ever lost.

Only tensors inside a mapping of the named file are touched (found through ``/proc/self/maps``):
anonymous memory is never paged out, so a model loaded into RAM never goes to swap. On systems
without ``/proc`` or ``madvise`` these functions do nothing.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path
from typing import Any, Iterable

MADV_PAGEOUT = 21


def page_out(tensor: Any, start: int = 0, stop: int | None = None) -> None:
    """Reclaim the whole pages of rows ``[start, stop)`` of a 2-D (or the whole of any) tensor."""
    try:
        if tensor.dim() >= 2:
            row_bytes = int(tensor[0].numel()) * tensor.element_size()
            stop = tensor.shape[0] if stop is None else stop
        else:
            row_bytes, start, stop = tensor.numel() * tensor.element_size(), 0, 1
        addr = tensor.data_ptr() + start * row_bytes
        length = (stop - start) * row_bytes
    except (AttributeError, IndexError, RuntimeError):
        return
    _advise(addr, length, MADV_PAGEOUT)


def _advise(addr: int, length: int, advice: int) -> None:
    page = mmap.PAGESIZE
    lo = -(-addr // page) * page   # whole pages inside the range only: never a neighbour's
    hi = (addr + length) // page * page
    if hi <= lo:
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), ctypes.c_int(advice))
    except (OSError, AttributeError):  # not Linux: the pages stay until the kernel needs them
        return


def file_mappings(path: str | os.PathLike[str]) -> list[tuple[int, int]]:
    """Address ranges of this process's mappings of ``path`` (empty without ``/proc``)."""
    target = os.path.realpath(path)
    ranges = []
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].rstrip("\n") == target:
                    lo, hi = fields[0].split("-")
                    ranges.append((int(lo, 16), int(hi, 16)))
    except OSError:
        return []
    return ranges


def mapped_tensors(tensors: Iterable[Any], path: Path, min_bytes: int = 16 * 1024**2) -> list[Any]:
    """The tensors of at least ``min_bytes`` that are views of a mapping of ``path``."""
    ranges = file_mappings(path)
    if not ranges:
        return []
    out = []
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if nbytes >= min_bytes and any(lo <= t.data_ptr() and t.data_ptr() + nbytes <= hi for lo, hi in ranges):
            out.append(t)
    return out


class MappedWeights:
    """The big file-mapped tensors of a module loaded from ``path``, found once; :meth:`release`
    pages them out (after each eager reference call)."""

    def __init__(self, module: Any, path: Path) -> None:
        self.tensors = mapped_tensors([*module.parameters(), *module.buffers()], path)

    def release(self) -> None:
        for t in self.tensors:
            page_out(t)
