"""Training checkpoints that are never resumed from damaged bytes.

``fit`` writes ``last.pt`` after every epoch (atomically, :mod:`trp.files`), first renaming
the one before to ``previous.pt``. Each checkpoint carries a SHA-256 over its whole content
(every tensor's dtype, shape and bytes, every other value, in a canonical order), computed
before it is written and checked after it is read. Resuming reads ``last.pt``; if it is
missing, empty, truncated or fails its checksum, ``previous.pt`` is used instead, with a
warning naming what was wrong (the damaged file is kept as ``last.pt.damaged``); if neither can be used, :class:`CheckpointError` says why
for each. Like the checksums in a model file (:mod:`trp.io`), these catch accidents, not
someone who rewrites a checkpoint and its checksum together.
"""

from __future__ import annotations

import hashlib
import io
import math
import warnings
from pathlib import Path
from typing import Optional

import torch

from trp import files
from trp.io import TrpFileError

LAST, PREVIOUS = "last.pt", "previous.pt"
FORMAT = "trp-checkpoint/1"


class CheckpointError(TrpFileError):
    """A training checkpoint that cannot be resumed from (unreadable, damaged, or written
    for another model or optimizer)."""


def _feed(h, obj) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}".encode())
        for key in sorted(obj, key=lambda k: (type(k).__name__, repr(k))):
            _feed(h, key)
            _feed(h, obj[key])
    elif isinstance(obj, (list, tuple)):
        h.update(f"{type(obj).__name__[0]}{len(obj)}".encode())
        for item in obj:
            _feed(h, item)
    elif isinstance(obj, (set, frozenset)):
        h.update(f"S{len(obj)}".encode())
        for item in sorted(obj, key=lambda k: (type(k).__name__, repr(k))):
            _feed(h, item)
    elif obj is None or isinstance(obj, (bool, int, str, torch.dtype, torch.device)):
        h.update(f"{type(obj).__name__}:{obj!r};".encode())
    elif isinstance(obj, float):
        h.update(f"float:{obj.hex() if math.isfinite(obj) else repr(obj)};".encode())
    else:
        raise TypeError(f"a checkpoint cannot hold a {type(obj).__name__} (trp checksums tensors, dicts, lists, "
                        "tuples, numbers, strings and None)")


def digest(payload: dict) -> str:
    """SHA-256 over everything in ``payload`` but its own ``digest`` entry."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in payload.items() if k != "digest"})
    return h.hexdigest()


def save(directory, payload: dict) -> Path:
    """Write ``payload`` as ``directory/last.pt`` with its checksum, keeping the one before
    as ``previous.pt``; returns the path written."""
    payload = {**payload, "format": FORMAT}
    payload["digest"] = digest(payload)
    buf = io.BytesIO()
    torch.save(payload, buf)
    path = Path(directory) / LAST
    files.atomic_write(path, buf.getvalue(), keep_previous=Path(directory) / PREVIOUS)
    return path


def read(path, map_location=None) -> dict:
    """The checkpoint at ``path``, its checksum verified; :class:`CheckpointError` if it
    cannot be read or does not match its checksum."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size == 0:
            raise CheckpointError(f"{path} is empty")
        state = torch.load(path, map_location=map_location, weights_only=True)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever torch.load raises, the file cannot be resumed from
        raise CheckpointError(f"{path} cannot be read (truncated or corrupt?): {type(e).__name__}: "
                              f"{str(e)[:300]}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a trp training checkpoint")
    if "digest" not in state and "format" not in state:  # both, so that one damaged key name is not enough
        warnings.warn(f"{path} was written by an older trp, without a checksum: resuming from it unverified",
                      RuntimeWarning, stacklevel=3)
        return state
    if "digest" not in state or not isinstance(state["digest"], str):
        raise CheckpointError(f"{path} has no checksum where this format keeps one (the file was damaged)")
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unsupported checkpoint format {state.get('format')!r} (this trp reads "
                              f"{FORMAT!r})")
    try:
        actual = digest(state)
    except TypeError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if actual != state["digest"]:
        raise CheckpointError(f"{path} does not match its checksum (the file was damaged after it was written)")
    return state


def load_latest(directory, map_location=None, quarantine: bool = True) -> Optional[dict]:
    """The newest usable checkpoint in ``directory`` (None when there is none at all). When
    ``last.pt`` is damaged and ``previous.pt`` is used, ``last.pt`` is renamed to
    ``last.pt.damaged`` (with ``quarantine``: one process of a distributed run), so that the
    next save does not rotate it over the good one."""
    directory = Path(directory)
    problems = []
    for path in (directory / LAST, directory / PREVIOUS):
        if not path.exists():
            continue
        try:
            state = read(path, map_location)
        except CheckpointError as e:
            problems.append(str(e))
            continue
        if path.name == PREVIOUS:
            why = "; ".join(problems) or f"{directory / LAST} is missing (a crash between two renames?)"
            if problems and quarantine:
                (directory / LAST).replace(directory / (LAST + ".damaged"))
                why += f" (kept as {LAST}.damaged)"
            warnings.warn(f"resuming from {path}, one epoch back: {why}", RuntimeWarning, stacklevel=2)
        return state
    if problems:
        raise CheckpointError("no checkpoint to resume from: " + "; ".join(problems))
    return None
