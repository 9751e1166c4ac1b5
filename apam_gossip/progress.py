"""A run's live progress on the terminal: a tqdm bar on a terminal, plain lines elsewhere,
and a line per evaluation. The command line and :func:`apam_gossip.run` show it."""

from __future__ import annotations

import sys
import time

from .result import format_metric


class ProgressPrinter:
    """Progress on stderr: a tqdm bar on a terminal; elsewhere (Slurm logs, ``| tee``),
    where a bar cannot redraw, a plain line every ``every_s`` seconds. Evaluations are
    printed as lines either way."""

    def __init__(self, quiet: bool, plain: bool | None = None, every_s: float = 10.0,
                 metric: str = "accuracy") -> None:
        self.quiet, self.metric = quiet, metric
        self.plain = (not sys.stderr.isatty()) if plain is None else plain
        self.every_s = every_s
        self.bar = None
        self.t_start = time.monotonic()
        self.last_line = 0.0

    def _line(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def __call__(self, ev) -> None:
        if self.quiet:
            return
        if ev.kind == "start":
            self.t_start = self.last_line = time.monotonic()
            self._line("  starting the worker processes (importing torch, loading data, "
                       "building models)...")
        if ev.kind == "died":
            self._write(f"  warning: {ev.message}; continuing with the other workers")
            return
        if self.plain:
            now = time.monotonic()
            if ev.kind == "progress" and now - self.last_line >= self.every_s:
                pct = 100 * ev.samples / ev.total_samples if ev.total_samples else 0.0
                self._line(f"  progress {pct:5.1f}%  samples={ev.samples}/{ev.total_samples}"
                           f"  {now - self.t_start:.0f} s since start")
                self.last_line = now
        else:
            from tqdm import tqdm

            if self.bar is None:
                self.bar = tqdm(total=ev.total_samples, unit="sample", unit_scale=True,
                                dynamic_ncols=True, leave=False, file=sys.stderr)
            self.bar.n = min(ev.samples, ev.total_samples)
            self.bar.refresh()
        if ev.kind == "eval" and ev.record is not None:
            r = ev.record
            loss = f"{r.train_loss:.4f}" if r.train_loss is not None else "  -   "
            self._write(f"  t={r.wall_time:7.2f}s  samples={r.samples:>9}  "
                        f"train_loss={loss}  test_{self.metric}="
                        f"{format_metric(self.metric, r.test_metric):>7}")
            self.last_line = time.monotonic()

    def _write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stdout)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


__all__ = ["ProgressPrinter"]
