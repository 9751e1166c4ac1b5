"""Command line: ``apam-gossip train | compare | topology | bench | demo``.

Every user mistake (flag, file, config value, missing data) ends in one line on stderr,
``apam-gossip: error: ...``, and exit code 2, without a traceback and without writing a
partial output file. The run flags are generated from the config schema
(:mod:`apam_gossip.config`). Each command imports the heavy modules it needs (torch, the
runners) when it runs, so ``apam-gossip --help`` stays well under a second.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

from . import __version__
from .config import ConfigError, RunConfig, load_config, merge, nest, schema_fields, to_toml
from .errors import UserError
from .placement import mpi_workers
from .result import format_metric

PROG = "apam-gossip"


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:  # one line, exit 2 (argparse prints usage too)
        self.exit(2, f"{PROG}: error: {message}{self._suggestion(message)} "
                  f"(see '{self.prog} --help')\n")

    def _suggestion(self, message: str) -> str:
        """'did you mean --lr?' for an unrecognized or misspelt flag."""
        import difflib

        if not message.startswith("unrecognized arguments:"):
            return ""
        known = {o for parser in self._all_parsers() for act in parser._actions
                 for o in act.option_strings}
        for word in message.split(":", 1)[1].split():
            if word.startswith("--"):
                near = difflib.get_close_matches(word.split("=")[0], sorted(known), n=1)
                if near:
                    return f"; did you mean {near[0]}?"
        return ""

    def _all_parsers(self) -> list[argparse.ArgumentParser]:
        out: list[argparse.ArgumentParser] = [self]
        for act in self._actions:
            if isinstance(act, argparse._SubParsersAction):
                out += list(act.choices.values())
        return out


def _slow(text: str) -> tuple[int, float]:
    try:
        w, f = text.split("=")
        return int(w), float(f)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid --slow value {text!r}: use WORKER=FACTOR, e.g. --slow 0=10") from None


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid list {text!r}: give numbers separated by commas, e.g. 1,1,4") from None


def _json_value(text: str) -> Any:
    import json

    try:
        return json.loads(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid value {text!r}: give JSON, e.g. '[[0, 1, 5.0, 1.0]]'") from None


class _SetKey(argparse.Action):
    """Stores a flag's value under its config key (``ns._cfg``) and remembers which
    flag set it (``ns._flag``), so an error about the key can name the flag typed."""

    def __init__(self, option_strings, dest, key: str, const_value: Any = None, **kw) -> None:
        self.key, self.const_value = key, const_value
        super().__init__(option_strings, dest, **kw)

    def __call__(self, parser, ns, values, option_string=None) -> None:
        value = self.const_value if self.nargs == 0 else values
        ns._cfg = {**getattr(ns, "_cfg", {}), self.key: value}
        ns._flag = {**getattr(ns, "_flag", {}), self.key: option_string}


_GROUPS = {"data": "data", "optim": "optimizer", "network": "emulated network"}
_HETEROGENEITY = ("slowdown", "straggler_prob", "straggler_factor")
_SINGLE_RUN_KEYS = ("checkpoint", "checkpoint_every_s")  # compare runs several


def _default_text(v: Any) -> str:
    if v is None or v == ():
        return ""
    if isinstance(v, bool):
        return " (default: on)" if v else " (default: off)"
    return f" (default: {v:g})" if isinstance(v, float) else f" (default: {v})"


def _add_run_flags(p: argparse.ArgumentParser, with_mode: bool = True,
                   single_run: bool = True) -> None:
    """The flags of a run, generated from the config schema (:mod:`apam_gossip.config`):
    every key is a flag (``--optim.lr``), plus its short aliases (``--lr``). ``single_run``
    adds those that only make sense for one run (--checkpoint, --resume, --save-model),
    which compare does not take."""

    groups: dict[str, Any] = {}

    def group(title: str):
        if title not in groups:
            groups[title] = p.add_argument_group(title)
        return groups[title]

    p.add_argument("--config", metavar="FILE", help="TOML or JSON config; flags override it")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config as TOML and exit")
    for spec in schema_fields():
        if spec.path == "mode" and not with_mode:
            continue
        if spec.path in _SINGLE_RUN_KEYS and not single_run:
            continue
        section = spec.path.split(".")[0] if "." in spec.path else ""
        title = _GROUPS.get(section) or ("heterogeneity" if spec.path in _HETEROGENEITY
                                         else "run")
        g = group(title)
        names = [spec.flag, *spec.flags]
        help_text = spec.help + _default_text(spec.default)
        ann = str(spec.annotation)
        if spec.is_bool:
            g.add_argument(*names, action=_SetKey, key=spec.path, nargs=0, const_value=True,
                           default=argparse.SUPPRESS, help=help_text)
            g.add_argument("--no-" + spec.flag[2:], action=_SetKey, key=spec.path, nargs=0,
                           const_value=False, default=argparse.SUPPRESS,
                           help=f"turn {spec.flag} off")
            continue
        kw: dict[str, Any] = {"action": _SetKey, "key": spec.path,
                              "default": argparse.SUPPRESS, "help": help_text}
        if spec.choices:
            kw["choices"] = spec.choices
        elif spec.path == "network.links":
            kw.update(type=_json_value, metavar="JSON")
        elif "tuple" in ann:
            kw.update(type=_floats, metavar="X,X,...")
        elif "int" in ann:
            kw.update(type=int, metavar="N")
        elif "float" in ann:
            kw.update(type=float, metavar="X")
        else:
            kw["metavar"] = {"data.data_dir": "DIR", "checkpoint": "PATH",
                             "topology": "FILE_OR_NAME"}.get(spec.path, "TEXT")
        g.add_argument(*names, **kw)
    h = group("heterogeneity")
    h.add_argument("--slow", type=_slow, action="append", metavar="WORKER=FACTOR",
                   help="make a worker FACTOR times slower (repeatable), e.g. --slow 0=10; "
                   "sets slowdown")
    o = group("optimizer")
    o.add_argument("--amsgrad-variant", choices=("practical", "paper"),
                   help="practical: Adam bias correction (= torch Adam(amsgrad=True)); "
                   "paper: the APAM paper's update; sets optim.bias_correction")
    out = group("output")
    out.add_argument("--output", "-o", metavar="PATH",
                     help="RunResult JSON path (default runs/<time>-<mode>-<model>-<dataset>"
                     ".json)")
    out.add_argument("--quiet", "-q", action="store_true",
                     help="no progress bar or eval lines")
    if not single_run:
        return
    out.add_argument("--save-model", metavar="PATH", help="also save the final model: a "
                     "state_dict plus what rebuilds it; apam_gossip.load_model(PATH) returns "
                     "the nn.Module")
    out.add_argument("--resume", metavar="PATH", help="continue the run saved in this "
                     "checkpoint, with the settings saved in it")


def _overrides(a: argparse.Namespace) -> tuple[dict[str, Any], dict[str, str]]:
    """The config keys the flags set (flat dotted keys) and, per key, the flag used."""
    values: dict[str, Any] = dict(getattr(a, "_cfg", {}))
    flags: dict[str, str] = dict(getattr(a, "_flag", {}))
    if "epochs" in values and "steps" in values:
        raise UserError(f"{flags['epochs']} and {flags['steps']} both set the budget; give one")
    if "epochs" in values:
        values["steps"] = None  # epochs given: a config file's steps must not win
    if a.amsgrad_variant is not None:
        values["optim.bias_correction"] = a.amsgrad_variant == "practical"
        flags["optim.bias_correction"] = "--amsgrad-variant"
    if a.slow:
        factors: dict[int, float] = dict(a.slow)
        n = values.get("workers")
        if n is not None and max(factors) >= n:
            raise UserError(f"--slow names worker {max(factors)} but --workers is {n} "
                            "(workers are numbered from 0)")
        if min(factors) < 0:
            raise UserError(f"--slow names worker {min(factors)}: workers are numbered from 0")
        values["slowdown"] = [factors.get(i, 1.0) for i in range(max(factors) + 1)]
        flags["slowdown"] = "--slow"
    return values, flags


def _given(a: argparse.Namespace) -> list[str]:
    """The flags given on the command line that shape the run (config keys, --config,
    --slow, --amsgrad-variant)."""
    _, flags = _overrides(a)
    extra = ["--config"] if getattr(a, "config", None) else []
    return extra + sorted(set(flags.values()))


def _ignored_flags(a: argparse.Namespace, cfg, modes: list[str]) -> list[str]:
    """Flags given on the command line that have no effect on a run of ``cfg`` in any of
    ``modes``, each with the reason (one warning line names them all; the table is
    :func:`~apam_gossip.config.ignored_settings`, which the loop API shares)."""
    from .config import ignored_settings

    _, flags = _overrides(a)
    return [f"{flags[k]} ({why})" for k, why in ignored_settings(flags, modes, cfg.optim, cfg)]


def _warn_ignored(a: argparse.Namespace, cfg, modes: list[str]) -> None:
    ignored = _ignored_flags(a, cfg, modes)
    if ignored:
        print(f"{PROG}: warning: ignored: {'; '.join(ignored)}", file=sys.stderr)


def _build_config(a: argparse.Namespace, base: dict[str, Any] | None = None):
    """The run's config: ``base`` (the demo's), the --config file, then the flags. An
    invalid value that came from a flag is reported with the flag's name."""
    import re


    values, flags = _overrides(a)
    over = merge(base or {}, nest(values))
    try:
        if a.config:
            return load_config(a.config, over)
        return RunConfig.from_dict(over)
    except ConfigError as e:
        key = re.sub(r"\[\d+\]$", "", e.key or "")
        if e.problem and key in flags and not e.problem.startswith("is not a config key"):
            which = f" ({e.key})" if e.key != key else ""  # an element: slowdown[3]
            raise UserError(f"{flags[key]}{which} {e.problem}") from None
        raise


def _print_config(cfg) -> int:

    print(to_toml(cfg.to_dict()), end="")
    return 0


def _mpi_rank(cfg) -> tuple[int, int]:
    """(rank, size) when this run goes over MPI, else (0, 1)."""
    from .runner import resolve_transport

    if resolve_transport(cfg) != "mpi":
        return 0, 1
    from .transport.mpi import world

    _, rank, size = world()
    return rank, size


def _abort_mpi(code: int) -> None:
    """If MPI is running with several ranks, end the whole job: a rank that just exits
    would leave the others waiting for it forever."""
    mod = sys.modules.get("mpi4py.MPI")
    if mod is None or not mod.Is_initialized() or mod.Is_finalized():
        return
    if mod.COMM_WORLD.Get_size() > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        mod.COMM_WORLD.Abort(code)


def _rank_prefix() -> str:
    mod = sys.modules.get("mpi4py.MPI")
    if mod is not None and mod.Is_initialized() and mod.COMM_WORLD.Get_size() > 1:
        return f"[rank {mod.COMM_WORLD.Get_rank()}] "
    return ""


def _default_output(cfg) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / _file_name(f"{stamp}-{cfg.mode}-{cfg.model}-{cfg.data.dataset}.json")


def _file_name(name: str) -> str:
    """A file name from names that may be import strings (``pkg.nets:make``)."""
    import re

    return re.sub(r"[^\w.-]+", "_", name)


def check_target(flag: str, target: float, metric: str) -> None:
    """A target accuracy is in (0, 1]; other metrics' targets are any finite number."""
    import math

    if metric == "accuracy" and not 0 < target <= 1:
        raise UserError(f"{flag} must be an accuracy in (0, 1], got {target}")
    if not math.isfinite(target):
        raise UserError(f"{flag} must be a finite number, got {target}")


def _check_output(path: Path, name: str = "--output") -> None:
    """Fail before training, not after, if the result cannot be written there."""
    from .files import check_output_path

    check_output_path(path, name)


def _train(a: argparse.Namespace, base: dict[str, Any] | None = None,
           banner: str | None = None) -> int:
    from .data import load_data
    from .runner import run

    resume = getattr(a, "resume", None)
    if resume:
        from .checkpoint import load_checkpoint

        given = _given(a)
        if given:
            raise UserError(f"--resume continues the checkpoint's run with the settings "
                            f"saved in it; drop {', '.join(given)} (or start a new run)")
        cfg = RunConfig.from_dict(load_checkpoint(resume)["config"])
    else:
        cfg = _build_config(a, base)
        _warn_ignored(a, cfg, [cfg.mode])
    if a.print_config:
        return _print_config(cfg)
    out = Path(a.output) if a.output else _default_output(cfg)
    _check_output(out)
    if a.save_model:
        _check_output(Path(a.save_model), "--save-model")
    dataset = load_data(cfg)
    rank, size = _mpi_rank(cfg)
    if rank != 0:
        a.quiet = True
    elif size > 1 and not a.quiet:
        n = mpi_workers(cfg.mode == "centralized", size)
        print(f"MPI: {size} ranks ({'rank 0 is the master, ' if cfg.mode == 'centralized' else ''}"
              f"{n} workers; --workers is taken from mpirun -n)")
        # a resume may run on fewer ranks than its checkpoint's run: its per-worker
        # settings are cut to the workers there are (runtime.mpi does the same)
        cfg = cfg.for_workers(n) if resume else cfg.replace(workers=n)
    if banner and not a.quiet:
        print(banner)
    ui = _ProgressUI(quiet=a.quiet, metric=cfg.metric)
    if not a.quiet:
        slow = ", ".join(f"worker {i} x{s:g}" for i, s in enumerate(cfg.slowdown) if s > 1)
        n_workers = 1 if cfg.mode == "sequential" else cfg.workers
        print(f"{cfg.mode}: {n_workers} worker(s), {cfg.model} on {cfg.data.dataset}, "
              f"{cfg.optim.name} lr={cfg.optim.lr:g}"
              + (f" ({cfg.optim.schedule})" if cfg.optim.schedule != "constant" else "")
              + f", batch {cfg.data.batch_size}"
              + (f", slowed: {slow}" if slow else ""))
    try:
        result = run(cfg, dataset=dataset, callback=ui, resume=resume)
    finally:
        ui.close()
    if result is None:  # an MPI rank other than 0: rank 0 reports and writes
        return 0
    result.save(out)
    if a.save_model:
        from .model_io import save_model
        from .task import make_task

        norm = dataset.normalization
        save_model(a.save_model, result.final_params, make_task(cfg, dataset, check=False),
                   dataset=cfg.data.dataset, normalization=norm.to_dict() if norm else None)
    if not a.quiet:
        print(summary_text(result))
        print(f"result written to {out}")
    return 0


def _compare(a: argparse.Namespace) -> int:
    from .compare import compare, comparison_table, plot_comparison, save_comparison
    from .data import load_data

    if a.results:
        return _compare_results(a)
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    if not modes:
        raise UserError("--modes is empty; give e.g. --modes centralized,decentralized")
    cfg = _build_config(a)
    check_target("--target", a.target, cfg.metric)
    if a.print_config:
        return _print_config(cfg)
    from .compare import mode_configs

    mode_configs(cfg, modes)  # every mode's config is valid before the first run starts
    _warn_ignored(a, cfg, modes)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(a.output) if a.output else Path("runs") / _file_name(
        f"{stamp}-compare-{cfg.model}-{cfg.data.dataset}.json")
    plot = Path(a.plot) if a.plot else out.with_suffix(".png")
    _check_output(out)
    _check_output(plot, "--plot")
    dataset = load_data(cfg)

    def announce(r) -> None:
        if not a.quiet:
            print(summary_text(r))

    results = []
    for m in modes:
        if not a.quiet:
            print(f"--- {m}: {cfg.workers if m != 'sequential' else 1} worker(s), {cfg.model} "
                  f"on {cfg.data.dataset}" + (f", topology {cfg.topology}"
                                              if m == "decentralized" else ""))
        ui = _ProgressUI(quiet=a.quiet, metric=cfg.metric)
        try:
            results += compare(cfg, [m], dataset=dataset, callback=ui, on_result=announce)
        finally:
            ui.close()
    table = comparison_table(results, a.target)
    save_comparison(results, out, a.target)
    plot_comparison(results, plot, a.target,
                    title=f"{cfg.model} on {cfg.data.dataset}, {cfg.workers} workers")
    print(table)
    print(f"results written to {out}; plot written to {plot}")
    return 0


def _compare_results(a: argparse.Namespace) -> int:
    """``compare --results A.json B.json ...``: the table (and plot) of finished runs, of
    ``train``, ``compare``'s own runs or a loop-API job (``init(result=...)``)."""
    from .compare import comparison_table, plot_comparison
    from .result import RunResult

    results = []
    for path in a.results:
        if not Path(path).is_file():
            raise UserError(f"--results: no such file {path}")
        d = RunResult.load(path)
        results.append(d)
    metrics = {(r.metric, r.higher_is_better) for r in results}
    if len(metrics) > 1:
        raise UserError(f"--results: the runs measure different metrics "
                        f"({', '.join(sorted(m for m, _ in metrics))}); compare runs of one "
                        "task")
    check_target("--target", a.target, results[0].metric)
    print(comparison_table(results, a.target))
    if a.plot:
        _check_output(Path(a.plot), "--plot")
        plot_comparison(results, Path(a.plot), a.target, title="compared runs")
        print(f"plot written to {a.plot}")
    return 0


def _launch(a: argparse.Namespace) -> int:
    """``launch -n N script.py [args]``: mpirun with the settings of
    :mod:`apam_gossip.mpirun`, this Python, the script's exit code. SIGTERM or SIGHUP
    (Slurm's time limit, a closed terminal) stops the whole job like Ctrl-C: exit 143
    (129); SIGUSR1/SIGUSR2 are passed on to every rank."""
    import subprocess

    from .mpirun import JobStopped, run_mpirun

    script = Path(a.script)
    if not script.is_file():
        raise UserError(f"launch: no such script {a.script}")
    if a.hostfile is not None and not Path(a.hostfile).is_file():
        raise UserError(f"--hostfile: no such file {a.hostfile}")
    if a.np < 1 or a.np > 4096:
        raise UserError(f"-n must be between 1 and 4096, got {a.np}")
    if a.timeout is not None and not 0 < a.timeout <= 1e7:
        raise UserError(f"--timeout must be > 0 seconds, got {a.timeout:g}")
    try:
        job = run_mpirun(a.np, [sys.executable, str(script), *a.args], timeout=a.timeout,
                         hostfile=a.hostfile, capture=False, signals=True)
    except subprocess.TimeoutExpired:
        print(f"{PROG}: error: the job ran past --timeout {a.timeout:g} s and was stopped",
              file=sys.stderr)
        return 124
    except JobStopped as e:
        print(f"{PROG}: launch {e}: every rank of the job was stopped", file=sys.stderr)
        return 128 + e.signum
    return job.returncode


def _bench(a: argparse.Namespace) -> int:
    from dataclasses import replace

    from .bench import MICRO_BENCHMARKS, bench_profile, profile_table
    from .profiles import load_profile, scaled

    simulate = a.command == "simulate" or getattr(a, "simulate", False)
    if a.command == "bench":
        if simulate:
            a.sim_workers = a.workers  # `bench --simulate --workers N` = `simulate --workers N`
        else:
            for flag in ("timing_only", "gradient_ms", "gradient_cv", "master_ms"):
                if getattr(a, flag) not in (None, False):
                    raise UserError(f"--{flag.replace('_', '-')} is a simulator flag: add "
                                    "--simulate (or use `apam-gossip simulate`)")
    if a.what in MICRO_BENCHMARKS and not simulate:
        for line in MICRO_BENCHMARKS[a.what](a):
            print(line)
        return 0
    profile = load_profile(a.what, smoke=a.smoke)
    if simulate and getattr(a, "scale", None):
        return _scale_study(a, profile)
    if simulate and a.sim_workers is not None:
        profile = scaled(profile, a.sim_workers)
    if a.modes:
        modes = tuple(m.strip() for m in a.modes.split(",") if m.strip())
        bad = [m for m in modes if m not in profile.modes]
        if bad or not modes:
            raise UserError(f"--modes: {bad[0] if bad else '(empty)'!r} is not one of the "
                            f"profile's modes {', '.join(profile.modes)}")
        profile = replace(profile, modes=modes)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    kind = "simulate" if simulate else "bench"
    out = Path(a.output) if a.output else Path("runs") / f"{kind}-{profile.name}-{stamp}.json"
    _check_output(out)
    metric = profile.base.metric
    sim = None
    if simulate:
        sim = _sim_options(a, profile)
    r = bench_profile(profile, out, quiet=a.quiet, simulate=sim, seeds=a.seeds,
                      callback_factory=lambda: _ProgressUI(quiet=a.quiet, metric=metric))
    if simulate:
        print(f"simulated ({'timing only' if a.timing_only else 'math'}), "
              f"{profile.base.workers} workers; times are virtual seconds")
    print(profile_table(profile, r["rows"]))
    print(f"results written to {out}; plots: {r['pngs'][0]}, {r['pngs'][1]}")
    return 0


def _sim_options(a: argparse.Namespace, profile) -> dict:
    """The simulator's keyword arguments: the profile's given costs, then the flags."""
    sim: dict = {"timing_only": a.timing_only, **profile.sim_costs}
    for key, flag in (("gradient_s", "gradient_ms"), ("master_update_s", "master_ms")):
        value = getattr(a, flag)
        if value is not None:
            if not 0 < value <= 1e7:
                raise UserError(f"--{flag.replace('_', '-')} must be > 0, got {value:g}")
            sim[key] = value / 1e3
    cv = getattr(a, "gradient_cv", None)
    if cv is not None:
        if not 0 <= cv <= 10:
            raise UserError(f"--gradient-cv must be in [0, 10], got {cv:g}")
        sim["gradient_cv"] = cv
    params = getattr(a, "model_params", None)
    if params is not None:
        if not 0 < params <= 10**11:
            raise UserError(f"--model-params must be > 0, got {params}")
        if "gradient_s" not in sim:
            raise UserError("--model-params needs --gradient-ms (or the profile's [simulate] "
                            "gradient_ms): that model's gradient cannot be timed here")
        sim["model_params"] = params
    return sim


def _scale_study(a: argparse.Namespace, profile) -> int:
    from .data import load_dataset
    from .sim.study import plot_study, scale_study, study_table

    try:
        workers = [int(w) for w in a.scale.split(",") if w.strip()]
    except ValueError:
        raise UserError(f"--scale must be worker counts like 8,16,32, got {a.scale!r}") \
            from None
    if not workers or min(workers) < 1 or max(workers) > 100_000:
        raise UserError(f"--scale must be worker counts between 1 and 100000, got {a.scale!r}")
    for flag, given in (("--seeds", a.seeds != 1), ("--modes", bool(a.modes)),
                        ("--workers", a.sim_workers is not None)):
        if given:
            raise UserError(f"--scale runs every study mode at each size with one seed; "
                            f"{flag} does not apply to it")
    sim = _sim_options(a, profile)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(a.output) if a.output else Path("runs") / f"scale-{profile.name}-{stamp}.json"
    _check_output(out)
    base = profile.base
    dataset = load_dataset(base.data.dataset, base.data.data_dir)
    n_train = dataset.subset(base.data.train_limit, None).train_size()
    if not a.timing_only and max(workers) > n_train:
        raise UserError(f"--scale {max(workers)} workers exceeds the {n_train} training "
                        "samples (each worker needs its shard in math mode; add "
                        "--timing-only)")
    rows = scale_study(profile, workers, dataset, **sim)
    import json

    from .files import atomic_write_text

    atomic_write_text(out, json.dumps({"profile": profile.name, "simulated": True,
                                       "options": sim, "rows": rows}, indent=2) + "\n")
    png = out.with_suffix(".png")
    plot_study(rows, png, f"{profile.name}: speed-up over all-reduce")
    print(study_table(rows))
    print(f"results written to {out}; plot: {png}")
    return 0


def _topology(a: argparse.Namespace) -> int:
    from .topology import (
        describe_text,
        draw_topology,
        load_topology,
        make_topology,
        validate_topology,
    )

    if a.workers is not None and a.workers < 1:
        raise UserError(f"--workers must be >= 1, got {a.workers}")
    n = a.workers
    if n is None:
        if not Path(a.spec).exists():
            raise UserError(f"--workers is required for a generated topology like {a.spec!r}")
        g = load_topology(a.spec)
        n = g.number_of_nodes()
    else:
        g = make_topology(a.spec, n, seed=a.seed)
    g = validate_topology(g, n)
    if a.png:
        _check_output(Path(a.png), "--png")
    print(describe_text(g, a.spec))
    if a.png:
        draw_topology(g, a.png, name=a.spec)
        print(f"drawing written to {a.png}")
    return 0


class _ProgressUI:
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


def summary_text(r) -> str:
    """A human summary of a RunResult."""
    lines = [
        f"{r.mode} ({r.transport}): {r.updates} updates, {r.samples} samples in "
        f"{r.wall_time:.2f} s ({r.samples_per_s:.0f} samples/s); "
        f"final test {r.metric} {format_metric(r.metric, r.final_metric)}",
    ]
    if r.mode == "decentralized" and r.evals and "consensus_distance" in r.evals[-1].extra:
        x = r.evals[-1].extra
        worst = x.get("worst_worker_metric")
        lines.append(f"averaged model x_bar: {format_metric(r.metric, r.final_metric)}; "
                     + (f"worst worker {format_metric(r.metric, worst)}; "
                        if worst is not None else "")
                     + "consensus distance "
                     f"{x['consensus_distance']:.3e}; {x['averages']} pairwise averages"
                     + (f" ({x['refused_averages']} refused: the peer was mid-average)"
                        if x.get("refused_averages") else "")
                     + (f"; audit: sum of models off by {x['audit_error']:.1e} (relative)"
                        if "audit_error" in x else "")
                     + (f", sum of u - vhat off by {x['audit_u_error']:.1e}"
                        if "audit_u_error" in x else ""))
    if r.mode in ("centralized", "decentralized") and r.staleness:
        mx = max(r.staleness)
        lines.append(f"staleness: mean {r.staleness_mean():.2f}, max {mx}; histogram "
                     + " ".join(f"{k}:{v}" for k, v in sorted(r.staleness.items())[:12])
                     + (" ..." if len(r.staleness) > 12 else ""))
    if r.failed_workers:
        lines.append(f"workers that died during the run (the run went on without them): "
                     f"{', '.join(map(str, r.failed_workers))}")
    if len(r.workers) > 1:
        lines.append("worker  slowdown  updates  samples/s  compute_s  device")
        for w in r.workers:
            lines.append(f"{w.worker:>6}  {w.slowdown:>8g}  {w.updates:>7}  "
                         f"{w.samples_per_s:>9.0f}  {w.compute_s:>9.2f}  {w.device}")
    return "\n".join(lines)


DEMO = {
    "mode": "centralized", "workers": 4, "model": "mlp", "epochs": 15, "evals": 5,
    "data": {"dataset": "digits", "batch_size": 32},
    # a cosine decay: the demo ends at (or within a few tenths of) its best evaluation
    # (constant lr: 5 seeds ended 0.3-2.4 points below their best)
    "optim": {"lr": 2e-3, "schedule": "cosine"},
    "slowdown": [1, 1, 1, 4],
}


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Asynchronous distributed training: centralized APAM "
                "(async AMSGrad master/worker) and decentralized gossip (AD-PSGD).")

    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    t = sub.add_parser("train", help="train a model", description="Train a model.",
                       usage=f"{PROG} train [options]")
    _add_run_flags(t)
    c = sub.add_parser("compare", help="run several modes on the same model, data, seed "
                       "and budget; print a table and plot accuracy curves",
                       description="Run centralized, decentralized and the sequential "
                       "reference on the same model, data, seed and sample budget.",
                       usage=f"{PROG} compare [options]")
    _add_run_flags(c, with_mode=False, single_run=False)
    c.add_argument("--modes", default="centralized,decentralized,sequential",
                   help="comma-separated modes to run (default: all three)")
    c.add_argument("--target", type=float, default=0.9,
                   help="the test metric to reach, for the time-to-target column (accuracy: a "
                   "fraction in (0, 1]; a lower-is-better metric is reached at or below it)")
    c.add_argument("--plot", metavar="PNG", help="plot path (default: next to --output)")
    c.add_argument("--results", nargs="+", metavar="JSON",
                   help="no runs: compare these finished runs' result files (train, "
                   "compare, or a loop-API job's init(result=...))")
    g = sub.add_parser("topology", help="describe (and draw) a gossip topology",
                       description="Load or generate a topology, validate it for N workers, "
                       "print degrees and the spectral gap of its expected gossip matrix.")
    g.add_argument("spec", metavar="FILE_OR_NAME")
    g.add_argument("--workers", type=int, help="number of workers (default: the file's "
                   "node count; required for generated topologies)")
    g.add_argument("--seed", type=int, default=0, help="seed for random topologies")
    g.add_argument("--png", metavar="PATH", help="also draw the graph to this PNG file")
    b = sub.add_parser("bench", help="benchmarks: a cluster PROFILE (every mode, table and "
                       "plots), or a micro-benchmark (transport, pairwise, shm-pairwise, "
                       "master, scaling)",
                       description="apam-gossip bench PROFILE.toml runs every mode of a "
                       "cluster profile (see launch/*.toml). Micro-benchmarks: 'transport' "
                       "compares shared memory with MPI on a training run; 'pairwise' times "
                       "one MPI pairwise average against a ping-pong; 'shm-pairwise' one "
                       "shared-memory pairwise average against a memcpy; 'master' the APAM "
                       "master's update rate against the memory-bandwidth bound; 'scaling' "
                       "homogeneous throughput from 1 to --max-workers workers.")
    b.add_argument("what", metavar="PROFILE|transport|pairwise|shm-pairwise|master|scaling")
    b.add_argument("--smoke", action="store_true", help="PROFILE: the quick [smoke] variant")
    b.add_argument("--modes", help="PROFILE: comma-separated subset of the profile's modes; "
                   "transport: centralized,decentralized")
    b.add_argument("--output", "-o", metavar="PATH", help="PROFILE: result JSON (PNGs next to "
                   "it; default runs/bench-<profile>-<time>.json)")
    b.add_argument("--quiet", "-q", action="store_true")
    b.add_argument("--workers", type=int, help="transport: workers (default 4); with "
                   "--simulate: simulate this many (as `simulate --workers`)")
    b.add_argument("--repeats", type=int, default=3, help="transport: alternations")
    b.add_argument("--train-args", default="--model lenet5 --dataset fashion-mnist "
                   "--train-limit 12000 --test-limit 500 --epochs 1 --evals 1",
                   help="transport: flags for each 'apam-gossip train' run (one string)")
    b.add_argument("--max-workers", type=int, help="scaling: largest N (default: the cores)")
    b.add_argument("--size-mb", type=float, default=4.0, help="pairwise, shm-pairwise, "
                   "master: model size (MB of float32; 100 = a 25M-parameter model)")
    b.add_argument("--reps", type=int, default=30, help="pairwise, shm-pairwise: repetitions")
    la = sub.add_parser("launch", help="start your own training script on N ranks (the "
                        "loop API: apam_gossip.init, DistributedOptimizer)",
                        description="Run `mpirun -n N python SCRIPT ARGS` with settings that "
                        "work out of the box (root, oversubscription, a private segment "
                        "folder), like horovodrun or bfrun.",
                        usage=f"{PROG} launch -n N [--hostfile H] [--timeout S] SCRIPT "
                        "[ARGS ...]")
    la.add_argument("-n", "--np", type=int, required=True, help="number of ranks")
    la.add_argument("--hostfile", help="an OpenMPI hostfile (several hosts)")
    la.add_argument("--timeout", type=float, help="stop the whole job after this many "
                    "seconds")
    la.add_argument("script", metavar="SCRIPT")
    la.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS")
    b.add_argument("--simulate", action="store_true", help="PROFILE: simulate every mode "
                   "instead of running it (see 'simulate')")
    sm = sub.add_parser("simulate", help="predict a cluster PROFILE at any number of workers "
                        "(discrete-event simulation of the real algorithms)",
                        description="Simulate every mode of a cluster profile on a virtual "
                        "clock: the real model, data and optimizer run in event order "
                        "(math mode), or only the timing (--timing-only). Writes the same "
                        "JSON and plots as bench.",
                        usage=f"{PROG} simulate PROFILE [--workers N] [--timing-only] "
                        "[options]")
    sm.add_argument("what", metavar="PROFILE")
    for parser in (b, sm):
        parser.add_argument("--timing-only", action="store_true",
                            help="simulate: no math, throughput and staleness only (fast, "
                            "up to 10,000 workers)")
        parser.add_argument("--gradient-ms", type=float, help="simulate: one gradient's "
                            "time at full speed (default: the profile's [simulate] "
                            "gradient_ms, else timed on this machine)")
        parser.add_argument("--gradient-cv", type=float, help="simulate: the spread of "
                            "gradient times, a coefficient of variation (default: "
                            "[simulate] gradient_cv, else 0.1; 0 = none)")
        parser.add_argument("--master-ms", type=float, help="simulate: the master's time "
                            "per update (default: [simulate] master_update_ms, else timed "
                            "on this machine; `bench master` measures it)")
    sm.add_argument("--workers", dest="sim_workers", type=int, help="simulate this many "
                    "workers (the profile's per-worker settings repeat)")
    sm.add_argument("--scale", metavar="N,N,...", help="the scale study: every mode at each "
                    "of these worker counts (speed-up over all-reduce; a table and a PNG)")
    sm.add_argument("--model-params", type=int, help="time the transfers and the "
                    "optimizer steps as for a model of this many parameters (e.g. "
                    "25000000; needs --gradient-ms); math mode still trains the "
                    "profile's model")
    sm.add_argument("--smoke", action="store_true", help="the profile's [smoke] variant")
    for parser in (b, sm):
        parser.add_argument("--seeds", type=int, default=1, help="PROFILE: run every mode "
                            "with this many seeds (the profile's, +1, ...); the table shows "
                            "mean±sd")
    sm.add_argument("--modes", help="comma-separated subset of the profile's modes")
    sm.add_argument("--output", "-o", metavar="PATH", help="result JSON (PNGs next to it)")
    sm.add_argument("--quiet", "-q", action="store_true")
    b.set_defaults(sim_workers=None)
    d = sub.add_parser("demo", help="a short real run on the embedded digits data",
                       description="APAM with 4 workers (one 4x slower) on scikit-learn's "
                       "real 8x8 digits; under a minute on 2 cores.")
    _add_run_flags(d)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command not in ("train", "demo"):
        return _run_command(args)
    from .coordinator import hold_stop_signals

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
        from .procs import ChildFailed
        from .runner import RunTimeout

        if isinstance(e, ChildFailed):
            if e.details:
                print(e.details.rstrip(), file=sys.stderr)
            print(f"{PROG}: error: {e}", file=sys.stderr)
            return 1
        if isinstance(e, RunTimeout):
            print(f"{PROG}: error: {e}", file=sys.stderr)
            return 1
        from .runner import RunInterrupted

        if isinstance(e, RunInterrupted):
            print(f"{PROG}: {e}", file=sys.stderr, flush=True)
            if sys.modules.get("mpi4py.MPI") is not None:
                from .runtime.mpi import exit_after_peers

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
