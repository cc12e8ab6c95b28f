"""Arrays that cross into the loader's worker processes without being copied.

The workers come from a fork server (``loaders.py``), so the dataset is pickled into each of them
when it starts. A numpy array pickles as its bytes: every worker would hold a copy of the feature
table. Here an array lives in shared memory instead (the storage of a torch tensor, which pickles
as a file descriptor) and a memory-mapped .npy pickles as its file name: a worker maps the same
pages. :class:`SharesArrays` gives a class that pickling; :func:`shared` moves an array into
shared memory once, so that several datasets over the same table share one copy.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from hpcpipe.errors import InputError

#: Where shm_open (torch's file-descriptor sharing) creates its files on Linux.
SHM_DIR = "/dev/shm"


@dataclass(frozen=True)
class _Mapped:
    """A memory-mapped .npy (``np.load(mmap_mode="r")``) as its file: opened again on unpickling."""

    filename: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    fortran: bool

    def open(self) -> np.ndarray:
        return np.memmap(self.filename, dtype=np.dtype(self.dtype), mode="r", offset=self.offset,
                         shape=self.shape, order="F" if self.fortran else "C")


def _shared_tensor(a: np.ndarray) -> torch.Tensor | None:
    """The shared-memory tensor that ``a`` is the whole of, or None."""
    base = a.base
    if (isinstance(base, torch.Tensor) and base.is_shared() and base.data_ptr() == a.ctypes.data
            and tuple(base.shape) == a.shape and a.flags.c_contiguous):
        return base
    return None


def shared(a: np.ndarray) -> np.ndarray:
    """``a`` in shared memory: itself when it is already there or memory-mapped from a file,
    else a copy there (a numpy view of a shared torch tensor). Raises :class:`InputError` when
    ``/dev/shm`` cannot hold it, instead of the bus error a full one would give later."""
    if isinstance(a, np.memmap) or a.size == 0 or _shared_tensor(a) is not None:
        return a
    a = np.ascontiguousarray(a)
    if a.dtype.kind not in "biuf":
        raise TypeError(f"shared memory holds numeric arrays only, not {a.dtype}")
    free = shm_free_bytes()
    if free is not None and a.nbytes > free:
        raise InputError(
            f"the training data loader's worker processes read the feature table from shared "
            f"memory, which needs {a.nbytes / 2**30:.2f} GiB more in {SHM_DIR} but has "
            f"{free / 2**30:.2f} GiB free; set train.num_workers=0 (no worker processes), or "
            f"run where {SHM_DIR} is larger (a container: --shm-size)")
    return torch.from_numpy(a).share_memory_().numpy()


def shm_free_bytes() -> int | None:
    """Free bytes in :data:`SHM_DIR` (None where there is no such folder)."""
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def pack(value: Any) -> Any:
    """What to pickle for ``value``: a memory-mapped array as its file, an array in shared
    memory as its tensor (a file descriptor), anything else as itself."""
    if isinstance(value, np.memmap) and value.filename:
        return _Mapped(str(value.filename), value.dtype.str, value.shape, int(value.offset),
                       bool(value.flags.f_contiguous and not value.flags.c_contiguous))
    if isinstance(value, np.ndarray):
        tensor = _shared_tensor(value)
        if tensor is not None:
            return tensor
    return value


def unpack(value: Any) -> Any:
    """The inverse of :func:`pack`, in the worker."""
    if isinstance(value, _Mapped):
        return value.open()
    if isinstance(value, torch.Tensor):
        return value.numpy()
    return value


class SharesArrays:
    """Pickles its attributes through :func:`pack` (mixin of the datasets' array holders)."""

    def __getstate__(self) -> dict[str, Any]:
        return {k: pack(v) for k, v in vars(self).items()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            object.__setattr__(self, k, unpack(v))
