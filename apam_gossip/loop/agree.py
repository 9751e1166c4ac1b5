"""The ranks' agreement: :func:`agreed` for :func:`~apam_gossip.loop.init`'s checks (every
rank's errors, printed once by rank 0), :func:`agree` for the model and optimizer every
rank built (one :class:`Signature` each, compared with the reference rank's)."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any

from ..config import OptimConfig
from ..errors import UserError
from ..flat import FlatModel, float_buffers, trainable
from .base import LoopError, Session, wait


def agreed(comm: Any, rank: int, problem: UserError | None, timeout_s: float) -> None:
    """Raise ``problem`` (one process), or under MPI every rank's problems on every rank:
    the same :class:`LoopError`, printed by rank 0, which names each rank that failed
    (``every rank`` when all failed alike); so an error of a few ranks is never lost in
    an MPI_Abort that another rank's print did not survive. A rank that never calls
    init() (it failed before, or took another branch) is an error after ``timeout_s``,
    not a hang."""
    if comm is None:
        if problem is not None:
            raise problem
        return
    req = comm.Ibarrier()  # every rank is here: then the allgather cannot block
    deadline = time.monotonic() + float(timeout_s)
    while not req.Test():
        if time.monotonic() > deadline:
            raise LoopError(f"rank {rank}: not every rank called apam_gossip.init() within "
                            f"timeout_s={float(timeout_s):g} s; each rank of the job must "
                            "call it (a rank that failed before it ends the job)")
        time.sleep(0.005)
    said = comm.allgather(None if problem is None else _without_rank(str(problem)))
    failed: dict[str, list[int]] = {}
    for r, msg in enumerate(said):
        if msg is not None:
            failed.setdefault(msg, []).append(r)
    if not failed:
        return
    lines = []
    for msg, ranks in failed.items():
        who = "every rank" if len(ranks) == len(said) and len(said) > 1 else \
            f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {_ranges(ranks)}"
        lines.append(f"{who}: {msg}")
    raise LoopError("\n".join(lines), collective=True)


def _without_rank(message: str) -> str:
    """A message without its leading ``rank R: `` (the agreement names the ranks)."""
    return re.sub(r"^rank \d+: ", "", message)


def _ranges(ranks: list[int]) -> str:
    """``0-3, 5`` for [0, 1, 2, 3, 5]."""
    out, start = [], ranks[0]
    for a, b in zip(ranks, [*ranks[1:], None], strict=True):
        if b != a + 1:
            out.append(f"{start}" if start == a else f"{start}-{a}")
            start = b
    return ", ".join(out)



@dataclass(frozen=True)
class Signature:
    """What must agree across ranks: every trained parameter's and float buffer's name,
    shape and dtype, the optimizer's settings (learning rate aside) and the choices that
    decide which collectives run (``setup``). ``lr0`` is only recorded."""

    entries: tuple[tuple[str, str, tuple[int, ...], str], ...]
    numel: int
    n_params: int
    optim: tuple[tuple[str, Any], ...]
    setup: tuple[tuple[str, Any], ...]
    lr0: float = field(compare=False, default=0.0)
    torch_opt: Any = None  # a wrapped optimizer's TorchSpec (the master rebuilds it)


def signature(flat: FlatModel, optim: OptimConfig, setup: dict[str, Any],
               lr0: float, torch_opt: Any = None) -> Signature:
    ids = {id(p) for p in trainable(flat.model)}
    entries = [("parameter", n, tuple(p.shape), str(p.dtype))
               for n, p in flat.model.named_parameters() if id(p) in ids]
    entries += [("buffer", n, tuple(b.shape), str(b.dtype))
                for n, b in float_buffers(flat.model)]
    hp = {k: v for k, v in optim.model_dump().items() if k not in ("lr", "schedule")}
    return Signature(tuple(entries), flat.numel, flat.n_params, tuple(sorted(hp.items())),
                     tuple(sorted(setup.items())), lr0, torch_opt)


def _first_difference(a: dict[str, Any], b: dict[str, Any]) -> str:
    return next(k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))


def differences(sigs: list[Signature | None], ref: int) -> str | None:
    """The first rank whose signature differs from rank ``ref``'s, in words (or None)."""
    base = sigs[ref]
    assert base is not None
    for r, s in enumerate(sigs):
        if s is None or r == ref or s == base:
            continue
        for what, mine, theirs in (("setting", s.setup, base.setup),
                                   ("optimizer setting", s.optim, base.optim)):
            if mine != theirs:
                a, b = dict(mine), dict(theirs)
                k = _first_difference(a, b)
                return (f"rank {r}: {what} {k}={a.get(k)!r} but rank {ref} has "
                        f"{b.get(k)!r}: every rank must make the same choices")
        if s.torch_opt != base.torch_opt:
            def say(t: Any) -> str:
                return "the built-in optimizer" if t is None else \
                    f"{t.name} with groups {[dict(h) for h, _ in t.groups]}"
            return (f"rank {r}: it wraps {say(s.torch_opt)} but rank {ref} "
                    f"{say(base.torch_opt)}: every rank must build the same optimizer")
        mine_e = {(e[0], e[1]): e[2:] for e in s.entries}
        theirs_e = {(e[0], e[1]): e[2:] for e in base.entries}
        for key, (shape, dtype) in theirs_e.items():
            if key not in mine_e:
                return f"rank {r}: its model has no {key[0]} {key[1]!r} (rank {ref}'s has)"
            if mine_e[key] != (shape, dtype):
                return (f"rank {r}: {key[0]} {key[1]!r} has shape {tuple(mine_e[key][0])} "
                        f"{mine_e[key][1]} but {tuple(shape)} {dtype} on rank {ref}: every "
                        "rank must build the same model")
        extra = sorted(set(mine_e) - set(theirs_e))
        if extra:
            return (f"rank {r}: its model has a {extra[0][0]} {extra[0][1]!r} that rank "
                    f"{ref}'s has not")
        return (f"rank {r}: its model registers its parameters and buffers in another order "
                f"than rank {ref}'s: build the model the same way on every rank")
    return None


def agree(s: Session, sig: Signature | None, ref: int) -> Signature:
    """Collective: gather every rank's signature at rank 0, compare with rank ``ref``'s
    and raise the same :class:`LoopError` on every rank if one differs. A barrier with a
    deadline comes first, so a rank that never gets here (it returned early) is a
    timeout, not a hang."""
    comm = s.comm
    wait(comm.Ibarrier(), s, "every rank to build its DistributedOptimizer")
    sigs = comm.gather(sig, root=0)
    verdict = differences(sigs, ref) if s.rank == 0 else None
    verdict, ref_sig = comm.bcast((verdict, sigs[ref] if s.rank == 0 else None), root=0)
    if verdict is not None:
        raise LoopError(verdict, collective=True)
    if s.n_masters > ref_sig.numel:
        raise LoopError(f"every rank: master_shards={s.n_masters} but the model has "
                        f"{ref_sig.numel} entries: give at most one shard per entry",
                        collective=True)
    if s.n_masters > 1 and ref_sig.torch_opt is not None:
        wrapped = ref_sig.torch_opt.name.rsplit(".", 1)[-1]
        raise LoopError(f"every rank: master_shards={s.n_masters} with a wrapped "
                        f"{wrapped}: each shard applies the built-in "
                        "optimizer to its slice of the model, and a torch optimizer runs "
                        "whole on one master; use optimizer='amsgrad' (or 'adam', 'sgd') or "
                        "master_shards=1", collective=True)
    return ref_sig
