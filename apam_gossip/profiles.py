"""Cluster profiles: TOML files describing a heterogeneous cluster and what to train on it.

A profile sets the emulated heterogeneity (``[compute]``: per-worker slowdown factors or
a random straggler distribution; ``[network]``: link latency and bandwidth, the
master's NIC, see :class:`apam_gossip.config.NetworkConfig`), the simulator's costs when
given rather than timed on this machine (``[simulate]``: ``gradient_ms``,
``master_update_ms``, ``worker_update_ms``, ``model_params``, ``gradient_cv``,
``compress_ms``, and the
hardware keys of :class:`apam_gossip.sim.hardware.Hardware`) and the benchmark run
(``[run]``: model, data, budget, target accuracy, the modes to compare and per-mode
learning rates). ``[smoke]`` overrides ``[run]`` for a quick version (``apam-gossip bench
PROFILE --smoke``).

Benchmark mode names (:data:`BENCH_MODES`): ``sequential``, ``allreduce-amsgrad``,
``allreduce-sgd``, ``dpsgd``, ``syncps-amsgrad`` (the APAM paper's synchronous parameter
server), ``async-sgd`` (APAM's master with SGD: the APAM paper's non-adaptive
comparator), ``centralized`` (APAM), ``centralized-lookahead``, ``decentralized`` (gossip)
``decentralized-no-overlap`` (gossip with each average after the gradient instead of
beside it), ``decentralized-int8`` and ``decentralized-topk`` (compressed averages, top
10%) and ``decentralized-fast`` (neighbours chosen by speed). A profile without ``modes``
runs them all.
"""

from __future__ import annotations

import difflib
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import ConfigError, RunConfig, merge, nest, short_keys

BENCH_MODES: dict[str, dict[str, Any]] = {
    "sequential": {"mode": "sequential"},
    "allreduce-amsgrad": {"mode": "allreduce"},
    "allreduce-sgd": {"mode": "allreduce", "optim": {"name": "sgd"}},
    "dpsgd": {"mode": "dpsgd"},
    # the APAM paper's synchronous AMSGrad with a parameter server (global batch split)
    "syncps-amsgrad": {"mode": "syncps"},
    "async-sgd": {"mode": "centralized", "optim": {"name": "sgd"}},
    "centralized": {"mode": "centralized"},
    "decentralized": {"mode": "decentralized"},
    # gossip with the average after the gradient, not beside it (AD-PSGD's second thread
    # off): shows what the overlap buys on a profile
    "decentralized-no-overlap": {"mode": "decentralized", "overlap": False},
    # APAM whose workers compute at the model where it will be when their gradient lands
    # (with the explicit momentum kept: the course to look ahead along)
    "centralized-lookahead": {"mode": "centralized", "optim": {"lookahead": 1.0}},
    # gossip whose averages send compressed changes (apam_gossip.core.compress), and
    # gossip that prefers the neighbours it averages with sooner
    "decentralized-int8": {"mode": "decentralized", "compress": "int8"},
    "decentralized-topk": {"mode": "decentralized", "compress": "topk:0.1"},
    "decentralized-fast": {"mode": "decentralized", "neighbour_choice": "fast"},
}
# [run] keys of the benchmark itself; every other [run] key is a run config key (as in a
# config file: ``epochs``, ``[run.optim]``, ...) or its short alias (``lr``, ``dataset``)
BENCH_KEYS = ("target", "modes", "lr_overrides", "sgd_lr", "momentum")
# [simulate]: the simulator's costs, given instead of timed on this machine (real runs
# ignore them): key -> (simulate()'s keyword, unit scale)
SIM_KEYS = {"gradient_ms": ("gradient_s", 1e-3), "master_update_ms": ("master_update_s", 1e-3),
            "worker_update_ms": ("worker_update_s", 1e-3),
            "model_params": ("model_params", 1), "gradient_cv": ("gradient_cv", 1),
            # compressed gossip: one side's compression time (default: timed here)
            "compress_ms": ("compress_s", 1e-3)}


@dataclass(frozen=True)
class ClusterProfile:
    name: str
    path: str
    base: RunConfig  # heterogeneity + training settings; ``mode`` is set per benchmark mode
    modes: tuple[str, ...]
    target: float
    lr_overrides: dict[str, float]
    sgd_lr: float
    momentum: float
    # [simulate]: the simulator's given costs as :func:`apam_gossip.sim.simulate`'s
    # keyword arguments (seconds; model_params); real runs ignore them
    sim_costs: dict[str, Any] = field(default_factory=dict)

    def config_for(self, bench_mode: str) -> RunConfig:
        """The RunConfig of one benchmark mode: the base with its mode and optimizer."""
        spec = BENCH_MODES[bench_mode]
        optim: dict[str, Any] = dict(spec.get("optim", {}))
        if optim.get("name") == "sgd":
            optim.update(lr=self.sgd_lr, momentum=self.momentum)
        if bench_mode in self.lr_overrides:
            optim["lr"] = self.lr_overrides[bench_mode]
        rest = {k: v for k, v in spec.items() if k != "optim"}
        return self.base.replace(optim=optim, **rest)


def load_profile(path: str | Path, smoke: bool = False) -> ClusterProfile:
    """Read and validate a profile; every problem is a ConfigError naming the file."""
    p = Path(path)
    try:
        d = tomllib.loads(p.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read cluster profile {p}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"cluster profile {p} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"cluster profile {p} is not valid TOML: {e}") from None
    try:
        return _build(d, p, smoke)
    except ConfigError as e:
        raise ConfigError(f"cluster profile {p}: {e}") from None


def _table(d: dict, key: str) -> dict:
    v = d.get(key, {})
    if not isinstance(v, dict):
        raise ConfigError(f"[{key}] must be a table")
    return v


def _build(d: dict, p: Path, smoke: bool) -> ClusterProfile:
    unknown = sorted(set(d) - {"name", "workers", "compute", "network", "simulate", "run",
                               "smoke"})
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r}; valid: name, workers, [compute], "
                          "[network], [simulate], [run], [smoke]")
    compute, network, run = _table(d, "compute"), _table(d, "network"), dict(_table(d, "run"))
    if smoke:
        run.update(_table(d, "smoke"))
    for k in set(compute) - {"slowdown", "straggler_prob", "straggler_factor"}:
        raise ConfigError(f"unknown [compute] key {k!r}; valid: slowdown, straggler_prob, "
                          "straggler_factor")
    sim_costs = _sim_costs(_table(d, "simulate"))
    run_config = _run_config(run)
    modes = run.get("modes", list(BENCH_MODES))
    if not isinstance(modes, list) or not modes or any(m not in BENCH_MODES for m in modes):
        raise ConfigError(f"[run] modes must be a non-empty list of {', '.join(BENCH_MODES)}; "
                          f"got {modes!r}")
    target = run.get("target", 0.9)
    if isinstance(target, bool) or not isinstance(target, (int, float)) \
            or not math.isfinite(target):
        raise ConfigError(f"[run] target must be a number, got {target!r}")
    lr_over = run.get("lr_overrides", {})
    if not isinstance(lr_over, dict) or any(k not in BENCH_MODES for k in lr_over):
        raise ConfigError(f"[run] lr_overrides must map mode names to learning rates, got "
                          f"{lr_over!r}")
    cfg = merge(run_config, {
        "workers": d.get("workers", 4), "network": network,
        **{k: compute[k] for k in ("slowdown", "straggler_prob", "straggler_factor")
           if k in compute},
    })
    base = RunConfig.from_dict(cfg)
    per = sim_costs.get("gradient_s")
    if isinstance(per, list) and len(per) not in (1, base.workers):
        raise ConfigError(f"[simulate] gradient_ms has {len(per)} entries; give one, or one "
                          f"per worker ({base.workers})")
    if base.known_metric == "accuracy" and not 0 < target <= 1:
        raise ConfigError(f"[run] target must be an accuracy in (0, 1], got {target!r}")
    for k, v in lr_over.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ConfigError(f"[run] lr_overrides.{k} must be > 0, got {v!r}")
    sgd_lr, momentum = run.get("sgd_lr", 0.05), run.get("momentum", 0.9)
    base.replace(optim={"name": "sgd", "lr": sgd_lr, "momentum": momentum}).validate()
    name = d.get("name", p.stem)
    if not isinstance(name, str):
        raise ConfigError(f"name must be a string, got {name!r}")
    return ClusterProfile(name=name, path=str(p), base=base, modes=tuple(modes),
                          target=float(target), lr_overrides={k: float(v) for k, v in
                                                              lr_over.items()},
                          sgd_lr=float(sgd_lr), momentum=float(momentum),
                          sim_costs=sim_costs)


def _sim_costs(table: dict[str, Any]) -> dict[str, Any]:
    """The [simulate] table as :func:`apam_gossip.sim.simulate` keyword arguments."""
    from .sim.hardware import HARDWARE_KEYS, Hardware

    out: dict[str, Any] = {}
    hw = {k: table[k] for k in HARDWARE_KEYS if k in table}
    if hw:
        out["hardware"] = Hardware.of(hw)  # checked here: a bad value is one line at load
    for k, v in table.items():
        if k in HARDWARE_KEYS:
            continue
        if k not in SIM_KEYS:
            raise ConfigError(f"unknown [simulate] key {k!r}; valid: "
                              f"{', '.join([*SIM_KEYS, *HARDWARE_KEYS])}")
        if k == "gradient_ms" and isinstance(v, list):  # one per worker
            if not v or any(isinstance(x, bool) or not isinstance(x, (int, float))
                            or not 0 < x <= 1e7 for x in v):
                raise ConfigError(f"[simulate] gradient_ms must be milliseconds > 0, one or "
                                  f"a list (one per worker), got {v!r}")
            out["gradient_s"] = [float(x) / 1e3 for x in v]
            continue
        if k == "gradient_cv":
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 10:
                raise ConfigError(f"[simulate] gradient_cv must be in [0, 10], got {v!r}")
        elif k == "model_params" and (isinstance(v, bool) or not isinstance(v, int)):
            raise ConfigError(f"[simulate] {k} must be a whole number of parameters, got "
                              f"{v!r}")
        else:
            limit = 1e11 if k == "model_params" else 1e7
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= limit:
                what = "a parameter count" if k == "model_params" else "milliseconds"
                raise ConfigError(f"[simulate] {k} must be {what} > 0, got {v!r}")
        key, scale = SIM_KEYS[k]
        out[key] = int(v) if k == "model_params" else float(v) * scale
    if "model_params" in out and "gradient_s" not in out:
        raise ConfigError("[simulate] model_params needs gradient_ms: that model's gradient "
                          "cannot be timed here")
    return out


def _run_config(run: dict[str, Any]) -> dict[str, Any]:
    """The run config keys of a [run] table (its bench keys left out), short aliases
    expanded: ``lr`` -> ``optim.lr``."""
    aliases = short_keys()
    top = set(RunConfig.model_fields)
    flat: dict[str, Any] = {}
    for k, v in run.items():
        if k in BENCH_KEYS:
            continue
        if k in top:
            flat[k] = v
        elif k in aliases:
            flat[aliases[k]] = v
        else:
            valid = sorted(top | set(aliases) | set(BENCH_KEYS))
            near = difflib.get_close_matches(k, valid, n=1)
            hint = f"did you mean {near[0]}? " if near else ""
            raise ConfigError(f"unknown [run] key {k!r}; {hint}valid: {', '.join(valid)}")
    nested = {k: v for k, v in flat.items() if "." not in k}
    return merge(nested, nest({k: v for k, v in flat.items() if "." in k}))


def scaled(profile: ClusterProfile, workers: int) -> ClusterProfile:
    """``profile`` with ``workers`` workers: its per-worker settings (slowdown, the
    network's per-worker latency and bandwidth) repeat cyclically, so "one slow worker in
    8" stays one in 8 at any size."""
    from dataclasses import replace

    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    base = profile.base
    n0 = base.workers

    def tile(values: tuple | list, pad: float) -> list:
        values = list(values)
        if not values:
            return values
        values += [pad] * (n0 - len(values))
        return [values[i % len(values)] for i in range(workers)]

    net = {"worker_latency_ms": tile(base.network.worker_latency_ms, 0.0),
           "worker_bandwidth_gbps": tile(base.network.worker_bandwidth_gbps, 0.0),
           # single links keep their ends: those to a worker past the new size go
           "links": [list(lk) for lk in base.network.links
                     if max(int(lk[0]), int(lk[1])) < workers]}
    return replace(profile, base=base.replace(workers=workers,
                                              slowdown=tile(base.slowdown, 1.0),
                                              network=net))
