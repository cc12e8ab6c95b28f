"""Checkpoints: plain dicts written by rank 0 to a temporary name and renamed into place.

``last.pt`` holds everything needed to continue exactly where training stopped (mid-epoch
included): model, optimizer, scheduler, GradScaler, epoch, optimizer step within the epoch, the
sampler position, every rank's RNG states, the sums of the metrics log interval in progress,
the normalisation statistics and the resolved config.
``best.pt`` holds the model with the best validation SMAPE so far, plus what prediction needs.
A crash while writing leaves the previous file intact; stale temporaries are ignored.

Both hold only tensors and plain data (dicts, lists, tuples, numbers, strings): numpy's RNG
state is stored as plain numbers. So they load with ``torch.load(weights_only=True)``, which
cannot run code: a tampered file that carries a pickled object is refused, not executed.
``last.pt`` also records what it was computed from (``computed_from``: a fingerprint of the
feature data and the training settings that shape the result); the recipe refuses to continue
from a checkpoint whose record differs from the run's (see ``recipe.py``).
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hpcpipe.errors import InputError
from hpcpipe.files import atomic_path, is_temp
from hpcpipe.steps.train import CHECKPOINTS

log = logging.getLogger(__name__)

#: 2: loadable with weights_only=True (numpy RNG state as plain numbers), ``computed_from``.
FORMAT_VERSION = 2


def checkpoint_dir(train_dir: Path) -> Path:
    return Path(train_dir) / CHECKPOINTS


def last_path(train_dir: Path) -> Path:
    return checkpoint_dir(train_dir) / "last.pt"


def best_path(train_dir: Path) -> Path:
    return checkpoint_dir(train_dir) / "best.pt"


def rng_state() -> dict[str, Any]:
    """This process's random number generator states, as tensors and plain data."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = [str(name), torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos),
                   int(has_gauss), float(cached)]
    state = {"python": random.getstate(), "numpy": numpy_state,
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(path: Path, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically (temporary name, fsync, rename)."""
    import os

    state = {"format_version": FORMAT_VERSION, **state}
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
    return path


def load(path: Path) -> dict[str, Any] | None:
    """The checkpoint at ``path`` on CPU, or None when there is none.

    Loaded with ``weights_only=True``: tensors and plain data only, so a file that would run
    code when unpickled is refused with :class:`InputError` and its code never runs.
    """
    import pickle

    path = Path(path)
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise InputError(
            f"{path}: refused to load: it holds objects other than tensors and plain data "
            f"({str(exc).splitlines()[0][:200]}). hpcpipe never writes such a checkpoint: it "
            "was tampered with, or written by an older hpcpipe. Loading it could run code, so "
            "it is not loaded; move it away and train again "
            "(`hpcpipe rerun train --fresh` moves the checkpoints aside)") from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise InputError(f"{path}: not a readable checkpoint ({exc}); move it away and train "
                         "again (`hpcpipe rerun train --fresh`)") from None
    if not isinstance(state, dict):
        raise InputError(f"{path}: not an hpcpipe checkpoint (a {type(state).__name__}, not a "
                         "dict); move it away and train again (`hpcpipe rerun train --fresh`)")
    return state


def remove_stale_temporaries(train_dir: Path) -> int:
    """Delete ``.tmp-*`` files a crashed writer left in the checkpoint folder; return how many."""
    folder = checkpoint_dir(train_dir)
    if not folder.is_dir():
        return 0
    stale = [p for p in folder.iterdir() if is_temp(p)]
    for p in stale:
        p.unlink(missing_ok=True)
    if stale:
        log.warning("removed %d unfinished checkpoint file(s) left by an earlier crash",
                    len(stale))
    return len(stale)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DistributedDataParallel (or the module itself)."""
    return getattr(model, "module", model)


def model_state(model: torch.nn.Module, frozen_encoder: bool) -> dict[str, torch.Tensor]:
    """The weights to store; a frozen encoder is left out (it is the model folder's, unchanged)."""
    state = unwrap(model).state_dict()
    if frozen_encoder:
        state = {k: v for k, v in state.items() if not k.startswith("encoder.")}
    return state


def load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load weights saved by :func:`model_state`; only encoder weights may be absent."""
    result = unwrap(model).load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("encoder.")]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"checkpoint does not fit the model: missing {missing[:5]}, "
                           f"unexpected {result.unexpected_keys[:5]}")


def scaler_state(scaler: torch.amp.GradScaler, kept: dict[str, Any]) -> dict[str, Any]:
    """The loss scaler's state to save: its own while it is on (fp16), else the one a
    checkpoint brought (``kept``), so that fp16 -> bf16 -> fp16 keeps the learned scale."""
    return scaler.state_dict() if scaler.is_enabled() else dict(kept)


def restore_scaler(scaler: torch.amp.GradScaler, saved: dict[str, Any]) -> dict[str, Any]:
    """Load a checkpoint's loss scaler state into ``scaler`` where both have one; return the
    saved state to keep (for :func:`scaler_state`).

    A checkpoint may come from another precision: trained in bf16, fp32 or on CPU (scaler off,
    saved as ``{}``) and continued in fp16 (scaler on), the scaler starts from its initial scale,
    where ``load_state_dict`` would fail ("The source state dict is empty"); the other way
    round, the saved scale is not used but kept.
    """
    if scaler.is_enabled():
        if saved:
            scaler.load_state_dict(saved)
        else:
            log.info("the checkpoint was trained without a loss scaler (bf16, fp32 or CPU): "
                     "fp16 starts from the initial loss scale %g", scaler.get_scale())
        return {}
    return dict(saved)
