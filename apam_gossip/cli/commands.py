"""The commands: ``train`` (and ``demo``), ``compare``, ``launch``, ``bench`` /
``simulate``, ``topology``. Each imports the heavy modules it needs (torch, the runtimes)
when it runs, so ``apam-gossip --help`` stays well under a second."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from ..config import RunConfig, to_toml
from ..errors import UserError
from .common import PROG
from .parser import _build_config, _given, _warn_ignored
from .ui import _ProgressUI, summary_text


def _print_config(cfg) -> int:

    print(to_toml(cfg.to_dict()), end="")
    return 0


def _mpi_rank(cfg) -> tuple[int, int]:
    """(rank, size) when this run goes over MPI, else (0, 1)."""
    from ..runner import resolve_transport

    if resolve_transport(cfg) != "mpi":
        return 0, 1
    from ..transport.mpi import world

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


def _settled_metric(cfg: RunConfig, dataset) -> str:
    """The metric's name for the progress lines and target checks: ``auto`` with a user's
    model is settled on its outputs, as :func:`~apam_gossip.task.make_task` settles it."""
    if cfg.known_metric != "auto":
        return cfg.known_metric
    from ..task import make_task

    return make_task(cfg, dataset, check=False).metric_obj().name


def _check_output(path: Path, name: str = "--output") -> None:
    """Fail before training, not after, if the result cannot be written there."""
    from ..files import check_output_path

    check_output_path(path, name)


def _train(a: argparse.Namespace, base: dict[str, Any] | None = None,
           banner: str | None = None) -> int:
    from ..data import load_data
    from ..runner import run

    resume = getattr(a, "resume", None)
    if resume:
        from ..checkpoint import load_checkpoint

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
    metric = _settled_metric(cfg, dataset)
    rank, size = _mpi_rank(cfg)
    if rank != 0:
        a.quiet = True
    elif size > 1 and not a.quiet:
        from ..config import ConfigError
        from ..placement import mpi_masters, mpi_workers

        masters = mpi_masters(cfg)
        n = mpi_workers(masters, size)
        if n < 1:  # (the runtime says the same on every rank)
            what = "a master" if masters == 1 else f"{masters} master shards"
            raise ConfigError(f"{cfg.mode} mode over MPI needs at least {masters + 1} ranks "
                              f"({what} and a worker): use mpirun -n {masters + 1} or more")
        who = "" if not masters else "rank 0 is the master, " if masters == 1 else \
            f"ranks 0-{masters - 1} are the master's shards, "
        print(f"MPI: {size} ranks ({who}{n} workers; --workers is taken from mpirun -n)")
        # a resume may run on fewer ranks than its checkpoint's run: its per-worker
        # settings are cut to the workers there are (runtime.mpi does the same)
        cfg = cfg.for_workers(n) if resume else cfg.replace(workers=n)
    if banner and not a.quiet:
        print(banner)
    ui = _ProgressUI(quiet=a.quiet, metric=metric)
    if not a.quiet:
        slow = ", ".join(f"worker {i} x{s:g}" for i, s in enumerate(cfg.slowdown) if s > 1)
        n_workers = 1 if cfg.mode == "sequential" else cfg.workers
        print(f"{cfg.mode}: {n_workers} worker(s), {cfg.model} on {cfg.data.dataset}, "
              f"{cfg.optim.name} lr={cfg.optim.lr:g}"
              + (f" ({cfg.optim.schedule})" if cfg.optim.schedule != "constant" else "")
              + f", batch {cfg.data.batch_size}"
              + (f", slowed: {slow}" if slow else ""))
    try:
        result = run(cfg, dataset=dataset, callback=ui, resume=resume, log=a.log)
    finally:
        ui.close()
    if result is None:  # an MPI rank other than 0: rank 0 reports and writes
        return 0
    result.save(out)
    if a.save_model:
        from ..model_io import save_model
        from ..task import make_task

        norm = dataset.normalization
        save_model(a.save_model, result.final_params, make_task(cfg, dataset, check=False),
                   dataset=cfg.data.dataset, normalization=norm.to_dict() if norm else None)
    if not a.quiet:
        print(summary_text(result))
        print(f"result written to {out}")
    return 0


def _compare(a: argparse.Namespace) -> int:
    from ..compare import compare, comparison_table, plot_comparison, save_comparison
    from ..data import load_data

    if a.results:
        return _compare_results(a)
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    if not modes:
        raise UserError("--modes is empty; give e.g. --modes centralized,decentralized")
    cfg = _build_config(a)
    check_target("--target", a.target, cfg.known_metric)
    if a.print_config:
        return _print_config(cfg)
    from ..compare import mode_configs

    mode_configs(cfg, modes)  # every mode's config is valid before the first run starts
    _warn_ignored(a, cfg, modes)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(a.output) if a.output else Path("runs") / _file_name(
        f"{stamp}-compare-{cfg.model}-{cfg.data.dataset}.json")
    plot = Path(a.plot) if a.plot else out.with_suffix(".png")
    _check_output(out)
    _check_output(plot, "--plot")
    dataset = load_data(cfg)
    metric = _settled_metric(cfg, dataset)
    check_target("--target", a.target, metric)

    def announce(r) -> None:
        if not a.quiet:
            print(summary_text(r))

    results = []
    for m in modes:
        if not a.quiet:
            print(f"--- {m}: {cfg.workers if m != 'sequential' else 1} worker(s), {cfg.model} "
                  f"on {cfg.data.dataset}" + (f", topology {cfg.topology}"
                                              if m == "decentralized" else ""))
        ui = _ProgressUI(quiet=a.quiet, metric=metric)
        try:
            results += compare(cfg, [m], dataset=dataset, callback=ui, on_result=announce,
                               log=a.log)
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
    from ..compare import comparison_table, plot_comparison
    from ..result import RunResult

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

    from ..mpirun import JobStopped, parse_hosts, run_mpirun

    script = Path(a.script)
    if not script.is_file():
        raise UserError(f"launch: no such script {a.script}")
    if a.hostfile is not None and not Path(a.hostfile).is_file():
        raise UserError(f"--hostfile: no such file {a.hostfile}")
    hosts = parse_hosts(a.hosts) if a.hosts is not None else None
    if hosts and a.hostfile is not None:
        raise UserError("-H and --hostfile both name the hosts: give one of them")
    if a.np is None:
        if not hosts:
            raise UserError("launch needs the number of ranks: -n N (or -np N, or -H "
                            "host:slots,... to start one rank per slot)")
        a.np = sum(k for _, k in hosts)
    if a.np < 1 or a.np > 4096:
        raise UserError(f"-n must be between 1 and 4096, got {a.np}")
    if a.timeout is not None and not 0 < a.timeout <= 1e7:
        raise UserError(f"--timeout must be > 0 seconds, got {a.timeout:g}")
    try:
        job = run_mpirun(a.np, [sys.executable, str(script), *a.args], timeout=a.timeout,
                         hostfile=a.hostfile, capture=False, signals=True, hosts=hosts)
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

    from ..bench import MICRO_BENCHMARKS, bench_profile, profile_table
    from ..profiles import load_profile, scaled

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
    if a.modes:  # the profile's modes, or any other bench mode on the same cluster
        from ..profiles import BENCH_MODES

        modes = tuple(m.strip() for m in a.modes.split(",") if m.strip())
        known = list(profile.modes) + [m for m in BENCH_MODES if m not in profile.modes]
        bad = [m for m in modes if m not in known]
        if bad or not modes:
            raise UserError(f"--modes: {bad[0] if bad else '(empty)'!r} is not a bench "
                            f"mode; use some of {', '.join(known)}")
        profile = replace(profile, modes=modes)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    kind = "simulate" if simulate else "bench"
    out = Path(a.output) if a.output else Path("runs") / f"{kind}-{profile.name}-{stamp}.json"
    _check_output(out)
    metric = profile.base.known_metric
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
    from ..data import load_dataset
    from ..sim.study import plot_study, scale_study, study_table

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

    from ..files import atomic_write_text

    options = {**sim, **({"hardware": sim["hardware"].describe()} if "hardware" in sim
                         else {})}  # a Hardware is a dataclass: its settings, as given
    atomic_write_text(out, json.dumps({"profile": profile.name, "simulated": True,
                                       "options": options, "rows": rows}, indent=2) + "\n")
    png = out.with_suffix(".png")
    plot_study(rows, png, f"{profile.name}: speed-up over all-reduce")
    print(study_table(rows))
    print(f"results written to {out}; plot: {png}")
    return 0


def _topology(a: argparse.Namespace) -> int:
    from ..topology import (
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


DEMO = {
    "mode": "centralized", "workers": 4, "model": "mlp", "epochs": 15, "evals": 5,
    "data": {"dataset": "digits", "batch_size": 32},
    # a cosine decay: the demo ends at (or within a few tenths of) its best evaluation
    # (constant lr: 5 seeds ended 0.3-2.4 points below their best)
    "optim": {"lr": 2e-3, "schedule": "cosine"},
    "slowdown": [1, 1, 1, 4],
}


