"""Command line: ``apam-gossip train | compare | topology | bench | simulate | launch | demo``.

The package's parts: :mod:`.parser` (the flags, generated from the schema), :mod:`.commands`
(one function per command), :mod:`.ui` (the progress line and the summary).

Every user mistake (flag, file, config value, missing data) ends in one line on stderr,
``apam-gossip: error: ...``, and exit code 2, without a traceback and without writing a
partial output file. The run flags are generated from the config schema
(:mod:`apam_gossip.config`). Each command imports the heavy modules it needs (torch, the
runtimes) when it runs, so ``apam-gossip --help`` stays well under a second.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import UserError
from .commands import (
    DEMO,
    _abort_mpi,
    _bench,
    _compare,
    _launch,
    _rank_prefix,
    _topology,
    _train,
    check_target,
)
from .common import PROG
from .parser import _build_config, build_parser, launch_spellings
from .ui import _ProgressUI, summary_text


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(launch_spellings(list(sys.argv[1:] if argv is None else argv)))
    if args.command not in ("train", "demo"):
        return _run_command(args)
    from ..coordinator import hold_stop_signals

    with hold_stop_signals():  # no stop request kills a run half-way, however early
        return _run_command(args)


def _run_command(args: argparse.Namespace) -> int:
    try:
        if args.command == "train":
            return _train(args)
        if args.command == "compare":
            return _compare(args)
        if args.command == "topology":
            return _topology(args)
        if args.command in ("bench", "simulate"):
            return _bench(args)
        if args.command == "launch":
            return _launch(args)
        if args.command == "demo":
            banner = ("demo: centralized APAM (asynchronous AMSGrad) on scikit-learn's real "
                      "8x8 handwritten digits:\n  a master process owns the model, 4 worker "
                      "processes send gradients; worker 3 is made 4x slower,\n  and the master "
                      "applies whichever gradient arrives first.")
            return _train(args, base=DEMO, banner=banner)
        raise AssertionError(args.command)
    except UserError as e:
        print(f"{PROG}: error: {_rank_prefix()}{e}", file=sys.stderr)
        _abort_mpi(2)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; all worker processes were stopped", file=sys.stderr)
        _abort_mpi(130)
        return 130
    except Exception as e:  # a failing child or timeout: say which, no traceback noise
        from ..procs import ChildFailed
        from ..runner import RunTimeout

        if isinstance(e, ChildFailed):
            if e.details:
                print(e.details.rstrip(), file=sys.stderr)
            print(f"{PROG}: error: {e}", file=sys.stderr)
            return 1
        if isinstance(e, RunTimeout):
            print(f"{PROG}: error: {e}", file=sys.stderr)
            return 1
        from ..runner import RunInterrupted

        if isinstance(e, RunInterrupted):
            print(f"{PROG}: {e}", file=sys.stderr, flush=True)
            if sys.modules.get("mpi4py.MPI") is not None:
                from ..runtime.mpi import exit_after_peers

                exit_after_peers(e.peers)
            return 143
        if sys.modules.get("mpi4py.MPI") is not None:
            import traceback

            traceback.print_exc()
            print(f"{PROG}: error: {_rank_prefix()}{type(e).__name__}: {e}", file=sys.stderr)
            _abort_mpi(1)
        raise


def entry() -> None:
    try:
        sys.exit(main())
    except BrokenPipeError:  # `apam-gossip ... | head`: the reader left; not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the exit's flush does not fail again
        sys.exit(141)


__all__ = ["main", "entry", "build_parser", "summary_text", "check_target", "PROG",
           "_ProgressUI", "_build_config"]
