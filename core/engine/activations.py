"""Where the calibration activations live between and during layers (inputs, float and
quantized outputs: 5.4 GB each in float32 for a 32B model at 128 x 2048): in memory, or past
the activation budget in a file (:class:`DiskActivations`) written a batch at a time in its
own dtype (results are bit-identical) and read back a batch at a time through a memory map."""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from qcore.errors import ConfigError
from qcore.hostmemory import proc_kb

#: share of the memory available when a run starts that activations may use by default
DEFAULT_BUDGET_FRACTION = 0.5


@dataclass(frozen=True)
class _Entry:
    offset: int
    nbytes: int
    shape: tuple[int, ...]
    dtype: torch.dtype


class _File:
    """One scratch file of batches, deleted when no view of it is left."""

    def __init__(self, directory: Path) -> None:
        fd, name = tempfile.mkstemp(prefix="activations-", suffix=".bin", dir=directory)
        os.close(fd)
        self.path = Path(name)
        self.entries: list[_Entry] = []
        weakref.finalize(self, _unlink, self.path)


class DiskActivations(Sequence[torch.Tensor]):
    """Batches appended to one file; ``self[i]`` maps batch ``i`` from disk onto ``device``,
    then applies the casts of :meth:`cast` views. The file goes with the last view of it."""

    def __init__(self, directory: Path, device: torch.device) -> None:
        self._file = _File(directory)
        self.path = self._file.path
        self.device = device
        self._casts: tuple[torch.dtype, ...] = ()

    def append(self, tensor: torch.Tensor) -> None:
        if self._casts:
            raise RuntimeError("a cast view of offloaded activations is read-only")
        t = tensor.detach().to("cpu").contiguous()
        entries = self._file.entries
        offset = entries[-1].offset + entries[-1].nbytes if entries else 0
        with open(self.path, "r+b") as f:
            f.seek(offset)
            f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B"))
        entries.append(_Entry(offset, t.numel() * t.element_size(), tuple(t.shape), t.dtype))

    def cast(self, dtype: torch.dtype) -> DiskActivations:
        """A view of the same file whose batches are converted to ``dtype`` as they are
        read (after the casts of this view, so rounding is what eager casts would do)."""
        return self._view(_casts=(*self._casts, dtype))

    def to(self, device: torch.device) -> DiskActivations:
        """A view of the same file whose batches are read onto ``device``."""
        return self._view(device=device)

    def _view(self, **changes: object) -> DiskActivations:
        view = object.__new__(DiskActivations)
        view.__dict__.update(self.__dict__, **changes)
        return view

    def _read(self, entry: _Entry) -> torch.Tensor:
        if entry.nbytes == 0:
            t = torch.empty(entry.shape, dtype=entry.dtype)
        else:
            mapped = np.memmap(self.path, dtype=np.uint8, mode="c", offset=entry.offset,
                               shape=(entry.nbytes,))
            t = torch.from_numpy(mapped).view(entry.dtype).reshape(entry.shape)
        t = t.to(self.device)
        for dtype in self._casts:
            t = t.to(dtype)
        return t

    def __getitem__(self, index: int | slice) -> torch.Tensor | list[torch.Tensor]:
        if isinstance(index, slice):
            return [self._read(e) for e in self._file.entries[index]]
        return self._read(self._file.entries[index])

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (self._read(e) for e in self._file.entries)

    def __len__(self) -> int:
        return len(self._file.entries)

    def shapes(self) -> list[tuple[int, ...]]:
        """Each batch's shape, without reading it."""
        return [e.shape for e in self._file.entries]

    def nbytes(self) -> int:
        return sum(e.nbytes for e in self._file.entries)


def _unlink(path: Path) -> None:
    with suppress(OSError):
        path.unlink()


@dataclass(frozen=True)
class ActivationPlan:
    """Whether a run keeps its calibration activations in memory or on disk, and why."""

    offload: bool
    budget_bytes: int
    in_memory_bytes: int  # the most the in-memory path holds at once (estimate)
    batch_bytes: int  # what one batch needs at least (inputs, float and quantized outputs)
    directory: Path | None = None

    @contextmanager
    def containers(self, device: torch.device
                   ) -> Iterator[Callable[[], list[torch.Tensor] | DiskActivations]]:
        """Within: a factory of empty containers for one layer's batches (lists, or files
        in a scratch folder under :attr:`directory` that is removed on exit)."""
        if not self.offload:
            yield list
            return
        assert self.directory is not None
        self.directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="qcore-activations-", dir=self.directory,
                                         ignore_cleanup_errors=True) as scratch:
            yield lambda: DiskActivations(Path(scratch), device)

    def describe(self) -> str:
        where = f"offloaded to {self.directory}" if self.offload else "in memory"
        return (f"calibration activations {where}: ~{_size(self.in_memory_bytes)} in "
                f"memory would be needed, the budget is {_size(self.budget_bytes)}")


def plan_activations(windows: int, seq_len: int, hidden: int, batch_size: int,
                     dtypes: tuple[torch.dtype, torch.dtype], all_fp_outputs: bool,
                     budget_bytes: int | None, directory: Path | None = None) -> ActivationPlan:
    """Where a run's activations live. ``dtypes``: (storage, work). In memory a layer holds
    its inputs in the work dtype, the float outputs (every batch when ``all_fp_outputs``)
    and the quantized outputs in the storage dtype; offloaded, one batch of each. A budget
    below one batch's needs is refused (no layer could run)."""
    storage, work = dtypes
    per_window = seq_len * hidden
    s, w = storage.itemsize, work.itemsize
    in_memory = windows * per_window * (w + (w if all_fp_outputs else 0) + s)
    batch = min(batch_size, windows) * per_window * (2 * w + s)
    if budget_bytes is None:
        budget_bytes = int(available_memory_bytes() * DEFAULT_BUDGET_FRACTION)
    if budget_bytes < batch:
        raise ConfigError(
            f"`activation_budget` {_size(budget_bytes)} cannot hold one layer's "
            f"activations for one batch: {_size(batch)} are needed ({batch_size} "
            f"x {seq_len} tokens x {hidden} features: inputs and float outputs in "
            f"{str(work).removeprefix('torch.')}, quantized outputs in "
            f"{str(storage).removeprefix('torch.')}); raise the budget or lower `batch_size`")
    offload = in_memory > budget_bytes
    folder = Path(directory or tempfile.gettempdir())
    if offload:
        free = shutil.disk_usage(folder if folder.exists() else folder.parent).free
        if free < in_memory:
            raise ConfigError(f"calibration activations need ~{_size(in_memory)}, more than the "
                              f"`activation_budget` of {_size(budget_bytes)}, and {folder} has "
                              f"only {_size(free)} free to offload them to; set `offload_dir` "
                              "on a larger disk, or fewer `samples`")
    return ActivationPlan(offload, budget_bytes, in_memory, batch, folder if offload else None)


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def available_memory_bytes() -> int:
    """MemAvailable of /proc/meminfo (Linux); elsewhere the physical memory."""
    kb = proc_kb("MemAvailable", "/proc/meminfo")
    if kb is not None:
        return int(kb) * 1024
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


