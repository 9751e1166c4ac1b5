"""Checkpoints: plain tensors and Python data, written atomically, loaded without code.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts saved with
``torch.save`` and read back with ``torch.load(..., weights_only=True)``, which refuses to
run code from the file. It is written to a temporary file in the same folder, fsynced and
renamed over the old one, so a crash or a kill during the write leaves the previous
checkpoint intact.

Decentralized mode: every worker's model (and tracked second moment) and its own optimizer
state, copied at one instant under all workers' locks (the optimizer states live in shared
memory for this), with the progress counters.

Contents (centralized mode): the config, the model ``x``, the optimizer state, the
progress (updates, samples, staleness histogram, per-worker counts, training seconds so
far), the master's torch RNG state and ``resumes`` (how often the run was resumed; it
seeds the workers' data order after a resume, since the order of an asynchronous run
cannot be replayed exactly anyway). A sharded master's checkpoint is the same, its
shards' parts joined (:func:`join_parts`), with each shard's version (``shard_versions``,
equal at a consistent cut).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from .errors import UserError
from .files import atomic_write_bytes

FORMAT = 1


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buf)
    atomic_write_bytes(Path(path), buf.getvalue())


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"checkpoint {p} does not exist; give the path that --checkpoint "
                        "wrote")
    try:
        d = torch.load(p, weights_only=True, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - any unreadable/unsafe file is a user error
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot read checkpoint {p}: {msg[:200]}") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT or "config" not in d:
        raise UserError(f"{p} is not an apam_gossip checkpoint (format {FORMAT})")
    optim = d["config"].get("optim") if isinstance(d["config"], dict) else None
    if isinstance(optim, dict) and "staleness_momentum" not in optim:
        # written before the momentum rule existed: the run goes on as it was trained
        # (the master's beta1 as given), not with today's default
        optim["staleness_momentum"] = "none"
    return d


def shard_part_path(path: str, index: int, count: int) -> str:
    """Where shard ``index`` of ``count`` saves its part of checkpoint ``path``."""
    return f"{path}.shard{index}-of-{count}"


def join_parts(path: str, parts: list[str | None]) -> None:
    """Join the shards' checkpoint parts (in shard order) into one checkpoint of the whole
    model at ``path`` (atomically; a sharded run resumes it with any number of shards),
    then remove the parts. The counts and staleness are the leader's."""
    from .core.apam import join_states

    loaded = [load_checkpoint(p) for p in parts if p is not None]
    assert len(loaded) == len(parts)
    whole = dict(loaded[0])
    whole.pop("shard", None)
    whole["x"] = torch.cat([c["x"] for c in loaded])
    whole["opt_state"] = join_states([c["opt_state"] for c in loaded])
    whole["wall_time"] = max(float(c["wall_time"]) for c in loaded)
    whole["shard_versions"] = [int(c["version"]) for c in loaded]
    whole.pop("format", None)
    save_checkpoint(path, whole)
    for p in parts:
        assert p is not None
        Path(p).unlink(missing_ok=True)
