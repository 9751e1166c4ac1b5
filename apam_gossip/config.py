"""One frozen dataclass tree describing a run; :meth:`RunConfig.validate` names bad fields.

A config is built from defaults, a TOML/JSON file (:func:`load_config`) and overrides,
always through :meth:`RunConfig.from_dict`, which rejects unknown keys and wrong types
with a :class:`ConfigError` naming the field (``optim.lr``, ``data.batch_size``, ...).
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .data import DATASETS
from .errors import UserError
from .models import MODELS
from .optim import OPTIMIZERS, SCHEDULES, Optimizer

MODES: tuple[str, ...] = ("centralized", "decentralized", "sequential", "allreduce", "dpsgd")
ASYNC_MODES: tuple[str, ...] = ("centralized", "decentralized")
PARTITIONS: tuple[str, ...] = ("iid", "dirichlet")
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")
TRANSPORTS: tuple[str, ...] = ("auto", "shm", "mpi")
ADAPTIVE_STATES: tuple[str, ...] = ("local", "tracked")


class ConfigError(UserError):
    """An invalid configuration value; the message names the field."""


@dataclass(frozen=True)
class OptimConfig:
    """The optimizer (see :mod:`apam_gossip.optim` for the variants' formulas).

    ``bias_correction=False`` is the APAM paper's AMSGrad, ``True`` the practical one
    (= ``torch.optim.Adam(amsgrad=True)``).
    """

    name: str = "amsgrad"
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    bias_correction: bool = True
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: str = "constant"  # learning rate over the budget: constant, cosine, linear

    def build(self) -> Optimizer:
        return Optimizer(**dataclasses.asdict(self))


@dataclass(frozen=True)
class DataConfig:
    """Dataset, its per-worker partition and the per-worker mini-batch size."""

    dataset: str = "digits"
    data_dir: str | None = None
    partition: str = "iid"
    dirichlet_alpha: float = 0.5
    batch_size: int = 32
    train_limit: int | None = None  # use only the first N training samples (quick runs)
    test_limit: int | None = None


@dataclass(frozen=True)
class NetworkConfig:
    """Emulated links: a transfer of ``B`` bytes between workers ``i`` and ``j`` (``-1`` is
    the master) sleeps ``latency + B / bandwidth`` where latency is ``latency_ms`` plus the
    larger of the two workers' extra ``worker_latency_ms`` and bandwidth the smallest of
    ``bandwidth_gbps`` and the two workers' ``worker_bandwidth_gbps`` (0 = unlimited).
    ``links`` overrides single links: ``[i, j, latency_ms, bandwidth_gbps]``.
    """

    latency_ms: float = 0.0
    bandwidth_gbps: float = 0.0
    worker_latency_ms: tuple[float, ...] = ()
    worker_bandwidth_gbps: tuple[float, ...] = ()
    links: tuple[tuple[float, ...], ...] = ()

    @property
    def active(self) -> bool:
        return bool(self.latency_ms or self.bandwidth_gbps or any(self.worker_latency_ms)
                    or any(self.worker_bandwidth_gbps) or self.links)


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines a run.

    The sample budget is ``epochs`` passes over the training set, or exactly ``steps``
    model updates when ``steps`` is set. ``slowdown[i]`` makes worker ``i`` sleep
    ``(slowdown[i] - 1) x`` its compute time after each gradient (1.0 = full speed;
    missing entries are 1.0), which injects heterogeneity on any machine.

    Stragglers: besides the fixed ``slowdown``, each gradient of any worker is
    ``straggler_factor`` times slower with probability ``straggler_prob``. ``network``
    emulates link latency and bandwidth (see :class:`NetworkConfig`). Both act the same way
    in every mode and transport.

    Synchronous baselines: ``allreduce`` (every step averages all workers' gradients, then
    every replica takes the same optimizer step: global batch = batch_size x workers) and
    ``dpsgd`` (synchronous D-PSGD: every round each worker mixes its neighbours' models
    with Metropolis-Hastings weights, then takes a local step).

    Decentralized mode: ``topology`` is a generator name (``ring``, ``complete``, ...) or
    a graph file (see :mod:`apam_gossip.topology`); ``adaptive_state`` is ``local``
    (each worker's AMSGrad moments stay private) or ``tracked`` (DAMSGrad-style: a
    second-moment estimate is gossiped along with the parameters).
    """

    mode: str = "centralized"
    workers: int = 4
    model: str = "mlp"
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    epochs: float = 1.0
    steps: int | None = None
    seed: int = 0
    slowdown: tuple[float, ...] = ()
    evals: int = 10
    device: str = "auto"
    threads_per_worker: int | None = None
    transport: str = "auto"
    timeout_s: float = 3600.0
    topology: str = "ring"
    adaptive_state: str = "local"
    audit: bool = False  # decentralized: check sum_i x_i == sum_i x_i(0) + all local steps
    straggler_prob: float = 0.0  # each gradient: with this probability ...
    straggler_factor: float = 1.0  # ... the worker is this many times slower
    network: NetworkConfig = field(default_factory=NetworkConfig)
    checkpoint: str | None = None  # write a checkpoint here (asynchronous modes) ...
    checkpoint_every_s: float = 60.0  # ... this often, and on SIGTERM

    # -- construction -------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        """Build and validate a config from nested plain data (file or JSON result)."""
        cfg = _from_dict(cls, d, prefix="")
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["slowdown"] = list(self.slowdown)
        return d

    def replace(self, **changes: Any) -> RunConfig:
        """A copy with top-level fields changed; ``data``/``optim`` may be dicts."""
        d = self.to_dict()
        for k, v in changes.items():
            if k in ("data", "optim") and isinstance(v, dict):
                d[k].update(v)
            else:
                d[k] = v
        return RunConfig.from_dict(d)

    def slowdown_of(self, worker: int) -> float:
        return self.slowdown[worker] if worker < len(self.slowdown) else 1.0

    # -- validation ---------------------------------------------------------------
    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first invalid field."""
        self._check_upper_bounds()
        if self.seed < 0:
            raise ConfigError(f"seed must be >= 0, got {self.seed}")
        _choice("mode", self.mode, MODES)
        _choice("model", self.model, MODELS)
        _choice("device", self.device, DEVICES)
        _choice("transport", self.transport, TRANSPORTS)
        _choice("adaptive_state", self.adaptive_state, ADAPTIVE_STATES)
        if self.adaptive_state == "tracked" and self.optim.name != "amsgrad":
            raise ConfigError(f"adaptive_state tracked needs optim.name amsgrad, "
                              f"got {self.optim.name!r}")
        if not self.topology:
            raise ConfigError("topology must name a generator (ring, complete, ...) or a file")
        if self.workers < 1:
            raise ConfigError(f"workers must be >= 1, got {self.workers}")
        if not self.epochs > 0:
            raise ConfigError(f"epochs must be > 0, got {self.epochs}")
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps}")
        if self.evals < 1:
            raise ConfigError(f"evals must be >= 1, got {self.evals}")
        if len(self.slowdown) > self.workers:
            raise ConfigError(
                f"slowdown has {len(self.slowdown)} entries but there are only "
                f"{self.workers} workers"
            )
        for i, s in enumerate(self.slowdown):
            if not s >= 1.0:
                raise ConfigError(f"slowdown[{i}] must be >= 1 (1 = full speed), got {s}")
        if not self.checkpoint_every_s > 0:
            raise ConfigError(f"checkpoint_every_s must be > 0, got {self.checkpoint_every_s}")
        if self.checkpoint is not None and self.mode not in ASYNC_MODES:
            raise ConfigError("checkpoint: only the centralized and decentralized modes "
                              f"write checkpoints so far (mode is {self.mode})")
        if not 0 <= self.straggler_prob <= 1:
            raise ConfigError(f"straggler_prob must be in [0, 1], got {self.straggler_prob}")
        if not self.straggler_factor >= 1:
            raise ConfigError(f"straggler_factor must be >= 1, got {self.straggler_factor}")
        net = self.network
        for name in ("latency_ms", "bandwidth_gbps"):
            if not getattr(net, name) >= 0:
                raise ConfigError(f"network.{name} must be >= 0, got {getattr(net, name)}")
        for name in ("worker_latency_ms", "worker_bandwidth_gbps"):
            vals = getattr(net, name)
            if len(vals) > self.workers:
                raise ConfigError(f"network.{name} has {len(vals)} entries but there are only "
                                  f"{self.workers} workers")
            for i, v in enumerate(vals):
                if not v >= 0:
                    raise ConfigError(f"network.{name}[{i}] must be >= 0, got {v}")
        for k, link in enumerate(net.links):
            if len(link) != 4:
                raise ConfigError(f"network.links[{k}] must be [i, j, latency_ms, "
                                  f"bandwidth_gbps], got {list(link)}")
            i, j, lat, bw = link
            for end in (i, j):
                if end != int(end) or not -1 <= end < self.workers:
                    raise ConfigError(f"network.links[{k}]: {end:g} is not a worker "
                                      f"(0..{self.workers - 1}) or -1 (the master)")
            if not (lat >= 0 and bw >= 0):
                raise ConfigError(f"network.links[{k}]: latency and bandwidth must be >= 0")
        if self.threads_per_worker is not None and self.threads_per_worker < 1:
            raise ConfigError(f"threads_per_worker must be >= 1, got {self.threads_per_worker}")
        if not self.timeout_s > 0:
            raise ConfigError(f"timeout_s must be > 0, got {self.timeout_s}")
        d, o = self.data, self.optim
        _choice("data.dataset", d.dataset, DATASETS)
        _choice("data.partition", d.partition, PARTITIONS)
        if not d.dirichlet_alpha > 0:
            raise ConfigError(f"data.dirichlet_alpha must be > 0, got {d.dirichlet_alpha}")
        if d.batch_size < 1:
            raise ConfigError(f"data.batch_size must be >= 1, got {d.batch_size}")
        for name in ("train_limit", "test_limit"):
            val = getattr(d, name)
            if val is not None and val < 1:
                raise ConfigError(f"data.{name} must be >= 1, got {val}")
        _choice("optim.name", o.name, OPTIMIZERS)
        _choice("optim.schedule", o.schedule, SCHEDULES)
        if not o.lr > 0:
            raise ConfigError(f"optim.lr must be > 0, got {o.lr}")
        for name in ("beta1", "beta2"):
            val = getattr(o, name)
            if not 0 <= val < 1:
                raise ConfigError(f"optim.{name} must be in [0, 1), got {val}")
        if not o.eps >= 0:
            raise ConfigError(f"optim.eps must be >= 0, got {o.eps}")
        if not 0 <= o.momentum < 1:
            raise ConfigError(f"optim.momentum must be in [0, 1), got {o.momentum}")
        if not o.weight_decay >= 0:
            raise ConfigError(f"optim.weight_decay must be >= 0, got {o.weight_decay}")


    def _check_upper_bounds(self) -> None:
        values: list[tuple[str, Any]] = [(k, getattr(self, k)) for k in _UPPER
                                         if "." not in k and k != "slowdown"]
        values += [(f"data.{k}", getattr(self.data, k)) for k in ("batch_size",)]
        values += [(f"optim.{k}", getattr(self.optim, k)) for k in ("lr", "eps",
                                                                     "weight_decay")]
        values += [(f"network.{k}", getattr(self.network, k)) for k in ("latency_ms",)]
        values += [("network.worker_latency_ms", v) for v in self.network.worker_latency_ms]
        values += [("slowdown", v) for v in self.slowdown]
        for name, v in values:
            if v is not None and v > _UPPER[name]:
                raise ConfigError(f"{name} must be <= {_num(_UPPER[name])}, got {_num(v)}")


def _num(v: float) -> str:
    """A bound or value as a person writes it: 4294967295, 1e+08, 0.5."""
    return str(int(v)) if float(v).is_integer() and abs(v) < 1e13 else f"{v:g}"


# Upper bounds that keep every value inside what a run can represent (float32 parameters,
# time.sleep, torch's thread pool, one machine's process table): past them a value is a
# typo, not a setting.
_UPPER: dict[str, float] = {
    "workers": 4096, "epochs": 1e6, "steps": 1e12, "seed": 2**32 - 1, "evals": 100_000,
    "threads_per_worker": 1024, "timeout_s": 1e8, "checkpoint_every_s": 1e8,
    "straggler_factor": 1e6, "slowdown": 1e6, "data.batch_size": 1e7, "optim.lr": 1e6,
    "optim.eps": 1.0, "optim.weight_decay": 1e6, "network.latency_ms": 1e7,
    "network.worker_latency_ms": 1e7,
}


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read a TOML (``.toml``) or JSON (``.json``) config file, apply ``overrides``.

    Overrides are nested dicts like the file (``{"optim": {"lr": 0.01}}``).
    """
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file {p}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {p} is not UTF-8 text") from None
    try:
        if p.suffix == ".toml":
            d = tomllib.loads(text)
        elif p.suffix == ".json":
            d = json.loads(text)
        else:
            raise ConfigError(f"config file {p} must end in .toml or .json")
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"config file {p} is not valid {p.suffix[1:].upper()}: {msg}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"config file {p} must hold a table/object at top level")
    if "config" in d and isinstance(d["config"], dict) and "mode" in d["config"]:
        d = d["config"]  # a RunResult JSON: rerun its config
    merged = _merge(d, overrides or {})
    try:
        return RunConfig.from_dict(merged)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _from_dict(cls: type, d: Any, prefix: str) -> Any:
    if not isinstance(d, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a table, got {d!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s}; valid keys: {', '.join(sorted(known))}"
        )
    kwargs = {}
    for f in fields(cls):
        if f.name not in d:
            continue
        kwargs[f.name] = _coerce(f"{prefix}{f.name}", hints[f.name], d[f.name])
    return cls(**kwargs)


def _coerce(name: str, tp: Any, value: Any) -> Any:
    """Check ``value`` against annotation ``tp``; ints are accepted for floats."""
    if dataclasses.is_dataclass(tp):
        return _from_dict(tp, value, prefix=f"{name}.")
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            return _coerce(name, a, value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        (elem,) = {a for a in typing.get_args(tp) if a is not Ellipsis}
        return tuple(_coerce(f"{name}[{i}]", elem, v) for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(f"{name} must be finite, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        return value
    raise AssertionError(f"unsupported config annotation {tp!r} for {name}")
