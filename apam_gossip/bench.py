"""``apam-gossip bench``: a cluster profile and the micro-benchmarks.

* ``bench PROFILE.toml`` (:func:`bench_profile`): every mode of a cluster profile (see
  ``launch/*.toml``) with the same model, data and budget, ``--seeds`` times; a table
  (:func:`profile_table`), accuracy and throughput plots (:func:`plot_profile`) and a
  JSON of every run; ``--simulate`` runs it on the simulator instead;
* ``master``: the APAM master's update rate against the memory-bandwidth bound;
  ``shm-pairwise``: one shared-memory pairwise average against a memcpy; ``scaling``:
  homogeneous throughput from 1 to ``--max-workers`` workers;
* ``contention``: the per-batch time of 1..``--max-workers`` one-thread workers computing
  at once on this machine, over one alone: the simulator's contention curve
  (:mod:`apam_gossip.sim.contention`);
* ``transport``: the same training run on the single-machine runtime (shared memory) and
  under ``mpirun``, alternated ``--repeats`` times, side by side; reports samples/s of
  each and the MPI/shm ratio (the goal: MPI within 20%).
* ``pairwise``: under ``mpirun -n 2``, the time of one atomic pairwise average of a model
  of ``--size-mb`` MB (the model out, the average back, which becomes the model) next to the
  MPI ping-pong time of the same number of bytes (send there and back).

``transport`` and ``pairwise`` launch ``mpirun`` themselves with the settings of
``launch/mpirun.sh``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .compare import fair_share, metric_axis
from .config import RunConfig
from .data import load_dataset
from .errors import UserError
from .files import atomic_write_bytes, atomic_write_text
from .mpirun import run_mpirun
from .optim import Optimizer
from .placement import available_cores
from .result import format_metric
from .runner import check_runnable, run
from .transport.mpi import MpiGossip, _wait, world
from .transport.shm import ShmGossip


def _run_cli(args: list[str], n_mpi: int | None, timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "r.json"
        cmd = [sys.executable, "-m", "apam_gossip", "train", *args, "-o", str(out), "-q"]
        if n_mpi is not None:
            p = run_mpirun(n_mpi, cmd, timeout=timeout)
        else:
            env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMI"))}
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        if p.returncode != 0:
            raise RuntimeError(f"benchmark run failed ({' '.join(cmd)}):\n{p.stderr[-2000:]}")
        return json.loads(out.read_text())


def bench_transport(mode: str, workers: int, train_args: list[str], repeats: int,
                    timeout: float = 600) -> dict:
    """Alternate shm and MPI runs of the same config; samples/s of each, and the ratio."""
    ranks = workers + 1 if mode == "centralized" else workers
    args = ["--mode", mode, "--workers", str(workers), *train_args]
    shm, mpi = [], []
    for _ in range(repeats):
        shm.append(_run_cli(args, None, timeout)["samples_per_s"])
        mpi.append(_run_cli(args, ranks, timeout)["samples_per_s"])
    return {"mode": mode, "workers": workers, "args": train_args, "shm_samples_per_s": shm,
            "mpi_samples_per_s": mpi, "ratio_median": statistics.median(mpi) /
            statistics.median(shm)}


def pairwise_worker(size_mb: float, reps: int) -> None:
    """Body of ``bench pairwise`` under ``mpirun -n 2``: rank 0 prints a JSON line."""
    import torch


    comm, rank, size = world()
    if size != 2:
        raise UserError("the pairwise benchmark needs exactly 2 ranks")
    numel = int(size_mb * 2**20 / 4)
    buf = torch.zeros(numel)
    peer = 1 - rank
    comm.Barrier()
    pingpong = []
    for _ in range(reps):
        t = time.perf_counter()
        if rank == 0:
            comm.Send(buf, dest=1, tag=1)
            comm.Recv(buf, source=1, tag=2)
        else:
            comm.Recv(buf, source=0, tag=1)
            comm.Send(buf, dest=0, tag=2)
        pingpong.append(time.perf_counter() - t)
    g = MpiGossip(comm, torch.randn(numel), tracked=False, total=0, timeout=60)
    comm.Barrier()
    avg = []
    if rank == 0:
        for _ in range(reps):
            t = time.perf_counter()
            g.average_with(peer)
            avg.append(time.perf_counter() - t)
    g.finish()
    # a memcpy of the model, for scale
    src = torch.randn(numel)
    copies = []
    for _ in range(reps):
        t = time.perf_counter()
        buf.copy_(src)
        copies.append(time.perf_counter() - t)
    _wait(comm.Ibarrier(), 60, "the other rank")
    if rank == 0:
        med = statistics.median
        print(json.dumps({"size_mb": size_mb, "reps": reps,
                          "pingpong_s": med(pingpong), "pairwise_average_s": med(avg),
                          "memcpy_s": med(copies),
                          "ratio_average_to_pingpong": med(avg) / med(pingpong)}))


def bench_pairwise(size_mb: float, reps: int, timeout: float = 300) -> dict:
    p = run_mpirun(2, [sys.executable, "-m", "apam_gossip.bench", "pairwise", str(size_mb),
                       str(reps)], timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"pairwise benchmark failed:\n{p.stderr[-2000:]}")
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("{")][-1]
    return json.loads(line)


if __name__ == "__main__":  # the mpirun side of bench_pairwise
    if sys.argv[1] == "pairwise":
        pairwise_worker(float(sys.argv[2]), int(sys.argv[3]))


# ------------------------------------------------------------------ cluster profiles
def isolated_ceiling(r) -> float:
    """Sum of the workers' isolated throughputs (samples per second of their own busy
    time: compute plus injected slowdown), the most a run could reach without waiting."""
    return sum(w.samples / (w.compute_s + w.sleep_s) for w in r.workers
               if w.compute_s + w.sleep_s > 0)


def profile_rows(profile, results: dict, n_train: int) -> list[dict]:
    """Per mode: time and epochs to target, the final metric, samples/s, speed-up over the
    synchronous all-reduce (AMSGrad) baseline, and throughput as a fraction of the ceiling."""
    base = results.get("allreduce-amsgrad")
    base_t = base.time_to_target(profile.target) if base is not None else None
    rows = []
    for name, r in results.items():
        reached = r.first_reaching(profile.target)
        t = reached.wall_time if reached else None
        s = reached.samples if reached else None
        ceiling = isolated_ceiling(r)
        rows.append({
            "mode": name, "workers": len(r.workers), "time_to_target_s": t,
            "samples_to_target": s,
            "epochs_to_target": s / n_train if s is not None else None,
            "metric": r.metric, "final_metric": r.final_metric,
            "final_acc": r.final_accuracy, "samples_per_s": r.samples_per_s,
            "speedup_vs_allreduce": (base_t / t) if (base_t and t) else None,
            "throughput_fraction_of_ceiling": r.samples_per_s / ceiling if ceiling else None,
            "wall_time": r.wall_time,
        })
    return rows


def seed_rows(per_seed: list[list[dict]]) -> list[dict]:
    """The rows of several seeds as one row per mode: each number the mean over the seeds
    that have it (time and epochs to target: those that reached it), with its standard
    deviation as ``<key>_sd``; ``seeds`` and ``reached`` count them."""
    if len(per_seed) == 1:
        return per_seed[0]
    rows = []
    for i, first in enumerate(per_seed[0]):
        same = [rs[i] for rs in per_seed]
        row: dict = {"mode": first["mode"], "workers": first["workers"],
                     "metric": first["metric"], "seeds": len(same),
                     "reached": sum(r["time_to_target_s"] is not None for r in same)}
        for key, v in first.items():
            if key in row or not (v is None or isinstance(v, (int, float))):
                continue
            vals = [r[key] for r in same if r[key] is not None]
            row[key] = statistics.fmean(vals) if vals else None
            row[f"{key}_sd"] = statistics.stdev(vals) if len(vals) > 1 else None
        rows.append(row)
    return rows


def profile_table(profile, rows: list[dict]) -> str:
    def f(v, fmt):
        return format(v, fmt) if v is not None else "-"

    def spread(r: dict, key: str, fmt: str) -> str:
        """``mean±sd (reached/seeds)`` over seeds, or the one value."""
        if "seeds" not in r:
            return f(r[key], fmt)
        sd = r.get(f"{key}_sd")
        text = f(r[key], fmt) + (f"±{sd:{fmt}}" if sd is not None else "")
        return text + (f" ({r['reached']}/{r['seeds']})" if key == "time_to_target_s" else "")

    metric = rows[0]["metric"] if rows else "accuracy"
    wide = 10 if rows and "seeds" in rows[0] else 0  # room for the spreads
    mw = max([18] + [len(r["mode"]) + 2 for r in rows])
    head = (f"{'mode':<{mw}}{'workers':>8}{'time to target':>{15 + wide}}"
            f"{'epochs to':>{10 + wide // 2}}{'final ' + metric:>15}{'samples/s':>11}"
            f"{'speed-up':>9}{'of ceiling':>11}")
    lines = [f"profile {profile.name} ({profile.path}), target {profile.target:g}", head,
             "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['mode']:<{mw}}{r['workers']:>8}"
            f"{spread(r, 'time_to_target_s', '.2f'):>{15 + wide}}"
            f"{spread(r, 'epochs_to_target', '.2f'):>{10 + wide // 2}}"
            f"{format_metric(r['metric'], r['final_metric']):>15}"
            f"{r['samples_per_s']:>11.0f}{f(r['speedup_vs_allreduce'], '.2f'):>9}"
            f"{f(r['throughput_fraction_of_ceiling'], '.0%'):>11}")
    lines.append("speed-up: time to target of allreduce-amsgrad / this mode's; of ceiling: "
                 "samples/s / sum of the workers' isolated samples/s")
    if wide:
        lines.append(f"mean±sd over {rows[0]['seeds']} seeds (time and epochs to target: of "
                     "the seeds that reached it, counted in brackets)")
    return "\n".join(lines)


def plot_profile(profile, results: dict, path: Path,
                 more_seeds: list[dict] | None = None) -> tuple[Path, Path]:
    """Two PNGs: accuracy vs wall time (every seed's curve, one colour per mode);
    per-worker throughput per mode (the first seed)."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure


    acc_png = path.with_name(path.stem + "-accuracy.png")
    thr_png = path.with_name(path.stem + "-throughput.png")
    fig = Figure(figsize=(8, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    scale, ylabel = metric_axis(next(iter(results.values())))
    for name, r in results.items():
        line, = ax.plot([e.wall_time for e in r.evals],
                        [scale * e.test_metric for e in r.evals], marker="o", ms=3, label=name)
        for other in more_seeds or []:
            o = other[name]
            ax.plot([e.wall_time for e in o.evals], [scale * e.test_metric for e in o.evals],
                    marker="o", ms=2, lw=0.8, alpha=0.6, color=line.get_color())
    ax.axhline(scale * profile.target, color="grey", ls="--", lw=0.8)
    ax.set_xlabel("wall time (s, training only)")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{profile.name}: {ylabel.split(' (')[0]} vs time")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(acc_png, buf.getvalue())

    fig = Figure(figsize=(9, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    names = list(results)
    n_max = max(len(r.workers) for r in results.values())
    if n_max <= 16:  # one bar per worker
        width = 0.8 / n_max
        for k in range(n_max):
            xs = [i + k * width for i, nm in enumerate(names) if k < len(results[nm].workers)]
            ys = [results[nm].workers[k].samples_per_s for nm in names
                  if k < len(results[nm].workers)]
            ax.bar(xs, ys, width, label=f"worker {k}")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names, rotation=20,
                      fontsize=8)
        ax.legend(fontsize=7, ncol=2)
    else:  # too many for bars (a simulated cluster): each worker a dot, spread sideways
        for i, nm in enumerate(names):
            ws = results[nm].workers
            xs = [i - 0.35 + 0.7 * k / max(1, len(ws) - 1) for k in range(len(ws))]
            ax.scatter(xs, [w.samples_per_s for w in ws], s=4)
        ax.set_xticks(range(len(names)), names, rotation=20, fontsize=8)
    ax.set_ylabel("samples/s (applied)")
    ax.set_title(f"{profile.name}: per-worker throughput")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(thr_png, buf.getvalue())
    return acc_png, thr_png


def _timed_once(profile, dataset, simulate: dict) -> dict:
    """The simulator's costs, the model timed once for every mode and seed (timed per
    simulation, modes would be compared on slightly different gradient times)."""
    from .sim.contention import resolve_hardware
    from .task import make_task

    if "hardware" in simulate:  # a contention curve to measure: once for every mode
        simulate = {**simulate, "hardware": resolve_hardware(
            simulate["hardware"], profile.base, dataset)}
    if {"gradient_s", "master_update_s", "worker_update_s"} <= set(simulate):
        return simulate
    from .sim.cluster import calibrate

    task = make_task(profile.base, dataset, check=False)
    g, u = calibrate(task, dataset, profile.base)
    if simulate.get("model_params"):  # an optimizer step is linear in the model size
        u *= simulate["model_params"] / task.initial_state()[1]
    return {"gradient_s": g, "master_update_s": u, "worker_update_s": u, **simulate}


def bench_profile(profile, out: Path, quiet: bool = False, callback_factory=None,
                  simulate: dict | None = None, seeds: int = 1) -> dict:
    """Run every mode of ``profile`` on the same model, data, seed and budget; write the
    JSON (table rows + all RunResults) and two PNGs next to ``out``. ``simulate``: do not
    run but simulate (:func:`apam_gossip.sim.simulate`, with these keyword arguments).
    ``seeds``: repeat everything with the profile's seed, seed + 1, ...; the rows are then
    means with standard deviations (:func:`seed_rows`), ``runs`` the first seed's results
    and ``seed_runs`` every seed's."""
    if seeds < 1:
        raise UserError(f"--seeds must be >= 1, got {seeds}")

    base = profile.base
    # every mode checked before the first run, all with the same core budget rule
    cfgs = {name: fair_share(profile.config_for(name)) for name in profile.modes}
    for cfg in cfgs.values():
        check_runnable(cfg)
    dataset = load_dataset(base.data.dataset, base.data.data_dir)
    n_train = min(len(dataset.y_train), base.data.train_limit or len(dataset.y_train))
    if simulate is not None:
        simulate = _timed_once(profile, dataset, simulate)
    by_seed: list[dict] = []
    for k in range(seeds):
        results = {}
        for name, cfg in cfgs.items():
            cfg = cfg.replace(seed=cfg.seed + k)
            if not quiet:
                print(f"--- {name}: {cfg.mode}, "
                      f"{cfg.workers if cfg.mode != 'sequential' else 1} worker(s), "
                      f"{cfg.optim.name} lr={cfg.optim.lr:g}"
                      + (f", seed {cfg.seed}" if seeds > 1 else ""), flush=True)
            if simulate is not None:
                from .sim import simulate as sim

                results[name] = sim(cfg, dataset=dataset, **simulate)
                continue
            cb = callback_factory() if callback_factory is not None else None
            try:
                results[name] = run(cfg, dataset=dataset, callback=cb)
            finally:
                if cb is not None and hasattr(cb, "close"):
                    cb.close()
        by_seed.append(results)
    results = by_seed[0]
    rows = seed_rows([profile_rows(profile, res, n_train) for res in by_seed])
    doc = {"profile": profile.name, "profile_path": profile.path, "target": profile.target,
           "simulated": simulate is not None, "seeds": seeds,
           "rows": rows, "runs": {k: r.to_dict() for k, r in results.items()}}
    if seeds > 1:
        doc["seed_runs"] = [{k: r.to_dict() for k, r in res.items()} for res in by_seed]
    atomic_write_text(out, json.dumps(doc, indent=2) + "\n")
    pngs = plot_profile(profile, results, out, by_seed[1:])
    return {"rows": rows, "results": results, "pngs": pngs, "by_seed": by_seed}


# ------------------------------------------------------------- in-process micro-benchmarks
def _median_time(fn, reps: int) -> float:
    return _median_times([fn], reps)[0]


def _median_times(fns: list, reps: int) -> list[float]:
    """The median time of each function, the functions taking turns rep by rep."""
    for fn in fns:
        fn()  # warm up
    ts: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for fn, t_fn in zip(fns, ts, strict=True):
            t = time.perf_counter()
            fn()
            t_fn.append(time.perf_counter() - t)
    return [statistics.median(t_fn) for t_fn in ts]


def bench_master(numel: int = 1_000_000, reps: int = 50) -> dict:
    """The APAM master's work per update for a model of ``numel`` parameters (AMSGrad step
    plus the copy of x into the worker's parameter slot), against the memory-bandwidth
    bound: the bytes an update must move at least (read g, m, v, vhat, x; write m, v, vhat,
    x; copy x into the slot) at the bandwidth of a large memcpy measured here."""
    import torch


    torch.set_num_threads(1)
    opt = Optimizer("amsgrad")
    x = torch.randn(numel)
    g = torch.randn(numel)
    slot = torch.zeros(numel)
    st = opt.init(x)

    def update() -> None:
        opt.update(x, g, st)
        slot.copy_(x)

    t_update = _median_time(update, reps)
    big_src = torch.randn(64 * 2**20 // 4)
    big_dst = torch.empty_like(big_src)
    t_copy = _median_time(lambda: big_dst.copy_(big_src), 10)
    bandwidth = 2 * big_src.numel() * 4 / t_copy  # bytes read + written per second
    min_bytes = (5 + 4 + 2) * numel * 4
    bound = bandwidth / min_bytes
    return {"numel": numel, "update_s": t_update, "updates_per_s": 1 / t_update,
            "memcpy_bandwidth_gb_s": bandwidth / 1e9, "bound_updates_per_s": bound,
            "fraction_of_bound": (1 / t_update) / bound}


def _shard_stepper(ctrl: Any, numel: int, reps: int, start: float) -> None:
    """One shard's master work, ``reps`` times: AMSGrad over its slice, the slice copied
    into a worker's slot (as :func:`bench_master` times the whole)."""
    import torch

    from .optim import Optimizer

    torch.set_num_threads(1)
    opt = Optimizer("amsgrad")
    x, g, slot = torch.randn(numel), torch.randn(numel), torch.zeros(numel)
    st = opt.init(x)
    for _ in range(2):  # warm up
        opt.update(x, g, st)
        slot.copy_(x)
    time.sleep(max(0.0, start - time.time()))
    t = time.perf_counter()
    for _ in range(reps):
        opt.update(x, g, st)
        slot.copy_(x)
    ctrl.send(time.perf_counter() - t)


def bench_master_shards(numel: int, shards: list[int], reps: int = 10,
                        timeout: float = 600.0) -> list[dict]:
    """The update rate of a sharded APAM master's work (issue 24): for each K, K processes
    (one thread each) step their slices of a ``numel``-parameter model at once, ``reps``
    updates each; a whole-model update is done when the slowest shard is, so the rate is
    ``reps / the slowest shard's time``. Each K's rate is measured twice, the K taking
    turns, and the better kept (a machine shared with other work)."""
    from .core.apam import shards_of
    from .procs import ProcessGroup

    def once(k: int) -> float:
        times: list[float] = []
        with ProcessGroup() as group:
            start = time.time() + 3.0  # every shard built and warm
            for s in shards_of(numel, numel, k):
                group.start(f"shard {s.index}", _shard_stepper, (s.numel, reps, start),
                            threads=1)
            deadline = time.monotonic() + timeout
            while len(times) < k:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"bench master: {k} shards took over {timeout:g} s")
                times += [m for _, m in group.poll(0.5)]
            group.join(timeout)
        return reps / max(times)

    rates: dict[int, list[float]] = {k: [] for k in shards}
    for _ in range(2):
        for k in shards:
            rates[k].append(once(k))
    base = max(rates[shards[0]])
    return [{"shards": k, "numel": numel, "updates_per_s": max(rates[k]),
             "rates": rates[k], "speedup": max(rates[k]) / base} for k in shards]


def bench_shm_pairwise(numel: int = 2**20, reps: int = 50) -> dict:
    """One shared-memory pairwise average (both locks, blend, copy back) vs a memcpy."""
    import torch


    torch.set_num_threads(1)
    g = ShmGossip(2, numel)
    g.x.normal_()
    end = g.end(0, 10.0)
    src, dst = torch.randn(numel), torch.randn(numel)
    # interleaved, so both see the same memory traffic from the machine's other tenants
    t_avg, t_copy = _median_times([lambda: end.average_with(1), lambda: dst.copy_(src)],
                                  reps)
    return {"numel": numel, "average_s": t_avg, "memcpy_s": t_copy,
            "ratio_average_to_memcpy": t_avg / t_copy}


def bench_scaling(modes: list[str], max_workers: int, base: dict, repeats: int = 1) -> list:
    """Homogeneous scaling: samples/s with N workers / (N x samples/s with 1 worker)."""

    cfg0 = RunConfig.from_dict(base)
    dataset = load_dataset(cfg0.data.dataset, cfg0.data.data_dir)
    rows = []
    for mode in modes:
        thr: dict[int, float] = {}
        for n in range(1, max_workers + 1):
            vals = [run(cfg0.replace(mode=mode, workers=n), dataset=dataset).samples_per_s
                    for _ in range(repeats)]
            thr[n] = statistics.median(vals)
        for n in range(1, max_workers + 1):
            rows.append({"mode": mode, "workers": n, "samples_per_s": thr[n],
                         "efficiency": thr[n] / (n * thr[1])})
    return rows


# ------------------------------------------------ the micro-benchmarks of `apam-gossip bench`
def _modes_flag(a, allowed: tuple[str, ...] = ("centralized", "decentralized")) -> list[str]:
    modes = [m.strip() for m in (a.modes or ",".join(allowed)).split(",") if m.strip()]
    for m in modes:
        if m not in allowed:
            raise UserError(f"--modes: {m!r} is not one of {', '.join(allowed)}")
    return modes


def _cli_pairwise(a) -> Iterator[str]:
    if not a.size_mb > 0 or a.reps < 1:
        raise UserError("--size-mb must be > 0 and --reps >= 1")
    r = bench_pairwise(a.size_mb, a.reps)
    yield (f"pairwise average of {a.size_mb:g} MB over MPI: {1e3 * r['pairwise_average_s']:.3f}"
           f" ms; ping-pong of {a.size_mb:g} MB: {1e3 * r['pingpong_s']:.3f} ms; ratio "
           f"{r['ratio_average_to_pingpong']:.2f}x (memcpy {1e3 * r['memcpy_s']:.3f} ms)")
    yield json.dumps(r)


def _numel_of(size_mb: float) -> int:
    if not 0 < size_mb <= 1e5:
        raise UserError(f"--size-mb must be in (0, 100000], got {size_mb:g}")
    return max(1, int(size_mb * 2**20 / 4))


def _cli_master(a) -> Iterator[str]:
    if a.shards:
        try:
            ks = [int(k) for k in a.shards.split(",")]
        except ValueError:
            raise UserError(f"--shards takes numbers such as 1,2,4, got {a.shards!r}") from None
        if not ks or min(ks) < 1:
            raise UserError(f"--shards must be >= 1, got {a.shards!r}")
        rows = bench_master_shards(_numel_of(a.size_mb), ks)
        for r in rows:
            yield (f"APAM master, {r['numel']:,} parameters over {r['shards']} shard(s): "
                   f"{r['updates_per_s']:.1f} updates/s, {r['speedup']:.2f}x "
                   f"{rows[0]['shards']} shard(s) (each K twice: "
                   f"{', '.join(f'{v:.1f}' for v in r['rates'])}; {available_cores()} cores)")
        yield json.dumps(rows)
        return
    r = bench_master(_numel_of(a.size_mb))
    yield (f"APAM master, {r['numel']:,} parameters: {r['updates_per_s']:.0f} updates/s "
           f"({1e3 * r['update_s']:.2f} ms each); memory-bandwidth bound "
           f"{r['bound_updates_per_s']:.0f}/s at {r['memcpy_bandwidth_gb_s']:.1f} GB/s: "
           f"{100 * r['fraction_of_bound']:.0f}% of the bound")
    yield json.dumps(r)


def _cli_scaling(a) -> Iterator[str]:

    # one torch thread per worker at every N: the 1-worker run must not use all cores
    base = {"model": "lenet5", "epochs": 1, "evals": 1, "topology": "complete",
            "threads_per_worker": 1,
            "data": {"dataset": "fashion-mnist", "train_limit": 12000, "test_limit": 500}}
    rows = bench_scaling(_modes_flag(a), a.max_workers or available_cores(), base,
                         repeats=a.repeats)
    for r in rows:
        yield (f"{r['mode']:<14} {r['workers']:>2} workers: {r['samples_per_s']:8.0f} "
               f"samples/s, efficiency {100 * r['efficiency']:.0f}%")
    yield json.dumps(rows)


def _cli_shm_pairwise(a) -> Iterator[str]:
    if a.reps < 1:
        raise UserError(f"--reps must be >= 1, got {a.reps}")
    r = bench_shm_pairwise(_numel_of(a.size_mb), a.reps)
    yield (f"shared-memory pairwise average of {r['numel'] * 4 / 2**20:g} MB: "
           f"{1e3 * r['average_s']:.3f} ms; memcpy {1e3 * r['memcpy_s']:.3f} ms; ratio "
           f"{r['ratio_average_to_memcpy']:.2f}x")
    yield json.dumps(r)


def _cli_transport(a) -> Iterator[str]:
    import shlex

    a.workers = 4 if a.workers is None else a.workers
    if a.workers < 1 or a.repeats < 1:
        raise UserError("--workers and --repeats must be >= 1")
    for mode in _modes_flag(a):
        r = bench_transport(mode, a.workers, shlex.split(a.train_args), a.repeats)
        shm = ", ".join(f"{v:.0f}" for v in r["shm_samples_per_s"])
        mpi = ", ".join(f"{v:.0f}" for v in r["mpi_samples_per_s"])
        yield (f"{mode}, {a.workers} workers: samples/s shm [{shm}]  mpi [{mpi}]  "
               f"MPI/shm (medians) {r['ratio_median']:.3f}")
        yield json.dumps(r)


def _cli_contention(a) -> Iterator[str]:
    import shlex

    from .cli.parser import _build_config, build_parser
    from .sim.contention import curve, measure_contention
    from .task import make_task

    if not 0 < a.seconds <= 3600:
        raise UserError(f"--seconds must be in (0, 3600], got {a.seconds:g}")
    if a.max_workers is not None and a.max_workers < 1:
        raise UserError(f"--max-workers must be >= 1 (default: the cores), got {a.max_workers}")
    args = shlex.split(a.train_args) if a.train_args != TRANSPORT_TRAIN_ARGS \
        else ["--model", "lenet5", "--dataset", "fashion-mnist", "--train-limit", "12000"]
    cfg = _build_config(build_parser().parse_args(["train", *args]))
    data = load_dataset(cfg.data.dataset, cfg.data.data_dir).subset(cfg.data.train_limit,
                                                                     cfg.data.test_limit)
    task = make_task(cfg, data, check=False)
    rows = measure_contention(cfg, task, data, a.max_workers, a.seconds)
    for r in rows:
        yield (f"{r['workers']:>3} co-running workers: {1e3 * r['batch_s']:7.2f} ms per batch, "
               f"factor {r['factor']:.3f} (rounds: "
               f"{', '.join(f'{f:.3f}' for f in r['factors'])})")
    yield (f"[simulate] contention = {curve(rows)}  # {cfg.model}, batch {cfg.data.batch_size}, "
           f"{available_cores()} cores here")
    yield json.dumps(rows)


# name -> lines to print (a summary, then the JSON), from the parsed `bench` flags
MICRO_BENCHMARKS: dict[str, Callable[[Any], Iterator[str]]] = {
    "pairwise": _cli_pairwise, "master": _cli_master, "scaling": _cli_scaling,
    "shm-pairwise": _cli_shm_pairwise, "transport": _cli_transport,
    "contention": _cli_contention,
}
# the default of `bench --train-args` (transport's flags); contention has its own
TRANSPORT_TRAIN_ARGS = ("--model lenet5 --dataset fashion-mnist --train-limit 12000 "
                        "--test-limit 500 --epochs 1 --evals 1")
