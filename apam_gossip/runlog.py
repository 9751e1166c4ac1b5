"""Where a run's messages and metrics go while it runs.

**Messages** (warnings, the loop API's summary, "result written to ...") go through the
Python logger ``apam_gossip``. A script that configured logging (a handler on the root
logger, e.g. ``logging.basicConfig``) gets them in its own handlers and format; otherwise
they are printed as the command line prints them: ``apam-gossip: warning: ...`` on
stderr, information on stdout. ``logging.getLogger("apam_gossip").setLevel(logging.WARNING)``
silences the information.

**Metrics** go to sinks named by a spec, ``--log SPEC`` on the command line (repeatable),
``run(..., log=[...])`` and ``apam_gossip.init(log=...)``:

* ``jsonl:PATH``: one JSON object per line, written and flushed as the run goes
  (``tail -f`` works): ``{"event": "eval" | "progress" | "died" | "end", "step": samples,
  "wall_s": ..., <scalars>}``;
* ``tensorboard:DIR``: a TensorBoard event file in ``DIR`` (by tensorboardX, a small
  writer with no TensorFlow: ``pip install 'apam_gossip[log]'``).

The scalars, each at the step = samples trained so far: ``test/<metric>``, ``test/loss``,
``train/loss``, ``throughput/samples_per_s`` (at each evaluation and every few seconds
between), ``consensus/distance`` (gossip), and at the end ``final/<metric>``,
``final/samples_per_s``, ``staleness/mean`` and ``staleness/max``.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

from .errors import UserError

PROG = "apam-gossip"
log = logging.getLogger("apam_gossip")


class _CliFormatter(logging.Formatter):
    """Warnings and errors as ``apam-gossip: warning: ...``; information as it is (a
    summary table, or a line that names the program itself)."""

    def format(self, record: logging.LogRecord) -> str:
        if record.levelno < logging.WARNING:
            return record.getMessage()
        return f"{PROG}: {record.levelname.lower()}: {record.getMessage()}"


class _CliHandler(logging.Handler):
    """Information to stdout, warnings and errors to stderr, as the command line does
    (the stream looked up at each record, so a test's captured streams receive it)."""

    def emit(self, record: logging.LogRecord) -> None:
        stream = sys.stdout if record.levelno < logging.WARNING else sys.stderr
        try:
            stream.write(self.format(record) + "\n")
            stream.flush()
        except (OSError, ValueError):  # a closed stream at exit: nothing to tell
            pass


def _configured() -> bool:
    """Whether the script configured logging: a handler on the root logger other than
    pytest's capturing ones (which a test run adds, the script did not)."""
    return any(not type(h).__module__.startswith("_pytest")
               for h in logging.getLogger().handlers)


def say(message: str, level: int = logging.INFO) -> None:
    """Log ``message`` (one line per line) on the ``apam_gossip`` logger."""
    if not log.handlers and not _configured():
        # nobody configured logging: print as the command line does, and only that way
        handler = _CliHandler()
        handler.setFormatter(_CliFormatter())
        log.addHandler(handler)
        log.propagate = False
        if log.level == logging.NOTSET:
            log.setLevel(logging.INFO)
    for line in message.splitlines() or [""]:
        log.log(level, line)


def warn(message: str) -> None:
    say(message, logging.WARNING)


# -- metric sinks ---------------------------------------------------------------------


class Sink(Protocol):
    def write(self, event: str, step: int, wall: float, scalars: dict[str, float],
              **more: Any) -> None: ...

    def close(self) -> None: ...


class JsonlSink:
    """``jsonl:PATH``: one JSON object per line, flushed at once."""

    def __init__(self, path: str) -> None:
        from .files import check_output_path

        check_output_path(path, "--log jsonl:PATH")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.f = open(path, "w", encoding="utf-8")  # noqa: SIM115 - closed by close()

    def write(self, event: str, step: int, wall: float, scalars: dict[str, float],
              **more: Any) -> None:
        row = {"event": event, "step": step, "wall_s": round(wall, 6),
               "time": round(time.time(), 3), **scalars, **more}
        self.f.write(json.dumps(row, allow_nan=True) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()


class TensorBoardSink:
    """``tensorboard:DIR``: scalars in a TensorBoard event file (tensorboardX)."""

    def __init__(self, logdir: str) -> None:
        try:
            from tensorboardX import SummaryWriter
        except ImportError as e:
            raise UserError("--log tensorboard:DIR needs tensorboardX: pip install "
                            "'apam_gossip[log]' (or pip install tensorboardX)") from e
        p = Path(logdir)
        if p.exists() and not p.is_dir():
            raise UserError(f"--log tensorboard:{logdir}: {logdir} is a file, not a folder")
        try:
            p.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"--log tensorboard:{logdir}: cannot make the folder "
                            f"({e.strerror})") from e
        self.writer = SummaryWriter(logdir=str(p))
        self.t0 = time.time()

    def write(self, event: str, step: int, wall: float, scalars: dict[str, float],
              **more: Any) -> None:
        for tag, value in scalars.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(tag, value, global_step=step, walltime=self.t0 + wall)
        if "message" in more:
            self.writer.add_text(event, str(more["message"]), global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def open_sink(spec: str) -> Sink:
    """The sink a spec names (see the module's docstring)."""
    kind, sep, where = spec.partition(":")
    if not sep or not where:
        raise UserError(f"--log {spec!r}: give tensorboard:DIR or jsonl:PATH")
    if kind == "jsonl":
        return JsonlSink(where)
    if kind in ("tensorboard", "tb"):
        return TensorBoardSink(where)
    raise UserError(f"--log {spec!r}: unknown kind {kind!r}; give tensorboard:DIR or "
                    "jsonl:PATH")


def as_specs(log_specs: str | Sequence[str] | None) -> list[str]:
    if log_specs is None:
        return []
    if isinstance(log_specs, str):
        return [log_specs]
    if not all(isinstance(s, str) for s in log_specs):
        raise TypeError(f"log must be a spec string or a list of them, got {log_specs!r}")
    return list(log_specs)


def spec_for(spec: str, label: str) -> str:
    """``spec`` for one run of several (``compare``): TensorBoard's habit, one subfolder
    per run (``DIR/label``); a JSON-lines file gets ``-label`` before its suffix."""
    kind, _, where = spec.partition(":")
    if kind == "jsonl":
        p = Path(where)
        return f"jsonl:{p.with_name(f'{p.stem}-{label}{p.suffix}')}"
    return f"{kind}:{Path(where) / label}"


class MetricsLog:
    """A run callback (:class:`~apam_gossip.reporting.Event` s) writing the scalars to
    every sink; :meth:`end` adds the result's summary and closes them."""

    PROGRESS_EVERY_S = 5.0

    def __init__(self, specs: Iterable[str], metric: str = "accuracy") -> None:
        self.sinks: list[Sink] = []
        try:
            for spec in specs:
                self.sinks.append(open_sink(spec))
        except BaseException:
            self.close()
            raise
        self.metric = metric
        # the run's clock (EvalRecord.wall_time), anchored at each evaluation: the first
        # comes at the start of training, after the processes started
        self.t0: float | None = None
        self.last_progress = 0.0

    def __bool__(self) -> bool:
        return bool(self.sinks)

    def _write(self, event: str, step: int, wall: float, scalars: dict[str, float],
               **more: Any) -> None:
        for s in self.sinks:
            s.write(event, step, wall, scalars, **more)

    def __call__(self, ev: Any) -> None:
        if not self.sinks:
            return
        now = time.monotonic()
        if ev.kind == "progress" and self.t0 is not None \
                and now - self.last_progress >= self.PROGRESS_EVERY_S:
            self.last_progress = now
            wall = now - self.t0
            self._write("progress", ev.samples, wall,
                        {"throughput/samples_per_s": ev.samples / wall if wall > 0 else 0.0})
        elif ev.kind == "eval" and ev.record is not None:
            self.t0, self.last_progress = now - ev.record.wall_time, now
            self.eval(ev.record)
        elif ev.kind == "died":
            wall = now - self.t0 if self.t0 is not None else 0.0
            self._write("died", ev.samples, wall, {}, message=ev.message)

    def progress(self, step: int, wall: float, scalars: dict[str, float]) -> None:
        """A progress line of the caller's own (the loop API's rank 0)."""
        self._write("progress", step, wall, scalars)

    def eval(self, r: Any) -> None:
        """One evaluation (an :class:`~apam_gossip.result.EvalRecord`)."""
        scalars = {f"test/{self.metric}": r.test_metric, "test/loss": r.test_loss,
                   "throughput/samples_per_s": r.samples / r.wall_time
                   if r.wall_time > 0 else 0.0}
        if r.train_loss is not None:
            scalars["train/loss"] = r.train_loss
        for k, v in r.extra.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                scalars["consensus/distance" if k == "consensus_distance" else f"run/{k}"] = v
        self._write("eval", r.samples, r.wall_time, scalars, updates=r.updates)

    def end(self, result: Any) -> None:
        """The run's summary, then close every sink."""
        try:
            if self.sinks and result is not None:
                scalars = {f"final/{result.metric}": result.final_metric,
                           "final/samples_per_s": result.samples_per_s}
                if result.staleness:
                    scalars["staleness/mean"] = result.staleness_mean()
                    scalars["staleness/max"] = float(max(result.staleness))
                self._write("end", result.samples, result.wall_time, scalars,
                            staleness={str(k): v for k, v in sorted(result.staleness.items())})
        finally:
            self.close()

    def close(self) -> None:
        sinks, self.sinks = self.sinks, []
        for s in sinks:
            s.close()


__all__ = ["say", "warn", "log", "MetricsLog", "open_sink", "spec_for", "JsonlSink",
           "TensorBoardSink"]
