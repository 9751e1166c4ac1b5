"""The one schema of a run: config files, command-line flags and validation all come
from the models below.

A config is a frozen tree of pydantic models (pydantic v2: the constraints are declared
next to each field instead of written out as checks; strict types, so ``"4"`` is not a
number and ``"no"`` not a boolean; unknown keys refused). It is built from defaults, a
TOML/JSON file (:func:`load_config`) and overrides, always through
:meth:`RunConfig.from_dict`. Every problem is a :class:`ConfigError` of one line that
names the key (``optim.lr must be > 0, got 0``); the command line names the flag
instead when the value came from one. The command line is generated from these fields
(:mod:`apam_gossip.cli`): every key is a flag (``--optim.lr``, ``--data.batch-size``,
``--timeout-s``), plus the short aliases declared here (``--lr``, ``--batch-size``,
``--timeout``), with the defaults in ``--help``.

This module imports no torch, so ``apam-gossip --help`` stays fast.
"""

from __future__ import annotations

import difflib
import json
import tomllib
from collections.abc import Collection
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    field_validator,
    model_validator,
)

from .errors import UserError
from .imports import is_import_string

# -- the vocabulary ---------------------------------------------------------------------
Mode = Literal["centralized", "decentralized", "sequential", "allreduce", "dpsgd", "syncps"]
ModelName = Literal["mlp", "lenet5", "allcnn"]
DatasetName = Literal["digits", "fashion-mnist", "mnist", "cifar10"]
OptimizerName = Literal["amsgrad", "adam", "sgd"]
ScheduleName = Literal["constant", "cosine", "linear"]
StalenessLr = Literal["none", "sqrt", "inverse"]
StalenessMomentum = Literal["none", "workers"]
GossipLr = Literal["none", "sqrt", "workers"]
Partition = Literal["iid", "dirichlet"]
Augment = Literal["none", "hflip"]
Device = Literal["auto", "cpu", "cuda"]
Transport = Literal["auto", "shm", "mpi"]
AdaptiveState = Literal["local", "tracked"]
NeighbourChoice = Literal["uniform", "fast"]

MODES: tuple[str, ...] = get_args(Mode)
ASYNC_MODES: tuple[str, ...] = ("centralized", "decentralized")
MODELS: tuple[str, ...] = get_args(ModelName)
DATASETS: tuple[str, ...] = get_args(DatasetName)
OPTIMIZERS: tuple[str, ...] = get_args(OptimizerName)
SCHEDULES: tuple[str, ...] = get_args(ScheduleName)
PARTITIONS: tuple[str, ...] = get_args(Partition)
DEVICES: tuple[str, ...] = get_args(Device)
TRANSPORTS: tuple[str, ...] = get_args(Transport)
ADAPTIVE_STATES: tuple[str, ...] = get_args(AdaptiveState)
LOSSES: tuple[str, ...] = ("cross_entropy", "mse", "l1")
METRICS: tuple[str, ...] = ("auto", "accuracy", "loss", "mse", "mae", "rmse")


def _builtin_or_import(key: str, value: str, builtins: tuple[str, ...]) -> None:
    """A built-in name or an import string (imported when the run starts, in the process
    that needs it, not here)."""
    if value not in builtins and not is_import_string(value):
        names = f"one of {', '.join(builtins)} or " if builtins else ""
        raise _rule(key, f"must be {names}an import string 'package.module:attribute', "
                    f"got {value!r}")

# lists come from TOML/JSON as lists: accept those for tuples, but keep the elements strict
Floats = Annotated[tuple[Annotated[float, Strict()], ...], Field(strict=False)]
Links = Annotated[tuple[Annotated[tuple[Annotated[float, Strict()], ...], Field(strict=False)],
                        ...], Field(strict=False)]


def _f(default: Any, help: str, *flags: str, **constraints: Any) -> Any:
    """A field with its ``--help`` text and its short command-line aliases."""
    return Field(default, description=help, json_schema_extra={"flags": list(flags)},
                 **constraints)


class ConfigError(UserError):
    """An invalid configuration value; ``key`` is the offending key (``optim.lr``) when
    known and ``problem`` the rest of the message (``must be > 0, got 0``)."""

    def __init__(self, message: str, key: str | None = None, problem: str | None = None) -> None:
        super().__init__(message)
        self.key, self.problem = key, problem


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise config_error(e, type(self)) from None


class OptimConfig(_Section):
    """The optimizer (see :mod:`apam_gossip.optim` for the variants' formulas);
    :class:`apam_gossip.optim.Optimizer` takes it as its hyper-parameters.

    ``bias_correction=False`` is the APAM paper's AMSGrad, ``True`` the practical one
    (= ``torch.optim.Adam(amsgrad=True)``)."""

    name: OptimizerName = _f("amsgrad", "optimizer", "--optimizer")
    lr: float = _f(1e-3, "learning rate", "--lr", gt=0, le=1e6)
    beta1: float = _f(0.9, "first-moment decay (amsgrad, adam)", "--beta1", ge=0, lt=1)
    beta2: float = _f(0.999, "second-moment decay (amsgrad, adam)", "--beta2", ge=0, lt=1)
    eps: float = _f(1e-8, "denominator guard (amsgrad, adam)", "--eps", ge=0, le=1)
    bias_correction: bool = _f(True, "amsgrad: Adam's bias correction (practical, = torch "
                               "Adam(amsgrad=True)); off is the APAM paper's update")
    momentum: float = _f(0.0, "SGD momentum", "--momentum", ge=0, lt=1)
    nesterov: bool = _f(False, "SGD: Nesterov momentum", "--nesterov")
    weight_decay: float = _f(0.0, "L2 weight decay", "--weight-decay", ge=0, le=1e6)
    schedule: ScheduleName = _f("constant", "learning rate over the budget (cosine and "
                                "linear decay towards 0)", "--schedule")
    warmup: float = _f(0.0, "linear learning-rate warm-up over this fraction of the budget",
                       "--warmup", ge=0, le=0.5)
    staleness_lr: StalenessLr = _f("none", "centralized: divide the lr of a gradient tau "
                                   "updates stale by sqrt(1 + tau) or 1 + tau",
                                   "--staleness-lr")
    staleness_momentum: StalenessMomentum = _f(
        "workers", "centralized: asynchrony adds momentum of its own, so the master "
        "shortens its first-moment window by the number of workers n: amsgrad/adam beta1 "
        "-> max(0, 1 - (1 - beta1) n); none: as given (the APAM paper)",
        "--staleness-momentum")
    lookahead: float = _f(
        0.0, "centralized, amsgrad/adam: hand each worker the master's model moved "
        "lookahead x (n - 1) updates ahead along its current step, about where it will be "
        "when the worker's gradient lands; it follows beta1 as given, so the "
        "staleness_momentum rule is off with it (0: the model as it is, the APAM paper)",
        "--lookahead", ge=0, le=4)
    gossip_lr: GossipLr = _f(
        "none", "decentralized: multiply the lr by sqrt(n) (Adam's square-root scaling "
        "rule) or n (workers: the linear rule): the average model moves 1/n of each local "
        "step; none: the lr as given", "--gossip-lr")


def ignored_settings(given: Collection[str], modes: Collection[str], optim: OptimConfig,
                     run: RunConfig | None = None) -> list[tuple[str, str]]:
    """The settings among ``given`` that have no effect on a run in any of ``modes`` with
    the optimizer ``optim`` (and, for ``train``, the rest of ``run``), each with the
    reason, in a fixed order. Settings are config keys (``topology``, ``optim.lookahead``)
    or the loop API's ``master``: one table of what applies to which mode for the CLI,
    which names flags, and the loop API, which names keywords; both warn and go on."""
    modes = set(modes)
    sgd = optim.name == "sgd"
    rows: list[tuple[tuple[str, ...], bool, str]] = [
        (("topology",), modes.isdisjoint({"decentralized", "dpsgd"}),
         "applies to the decentralized and dpsgd modes"),
        (("adaptive_state", "audit", "overlap", "optim.gossip_lr", "compress",
          "compress_gamma", "neighbour_choice"),
         "decentralized" not in modes, "applies to the decentralized mode"),
        (("compress_gamma",), "decentralized" in modes and run is not None
         and run.compress == "none", "applies with compress int8 or topk:F"),
        (("master", "master_shards", "optim.staleness_lr", "optim.staleness_momentum",
          "optim.lookahead"),
         "centralized" not in modes, "applies to the centralized mode"),
        (("master_device",), modes.isdisjoint({"centralized", "syncps"}),
         "applies to the centralized and syncps modes"),
        (("optim.staleness_momentum", "optim.lookahead"), "centralized" in modes and sgd,
         "applies to amsgrad and adam"),
        (("optim.staleness_momentum",), optim.lookahead > 0 and not sgd,
         "off with a lookahead, which follows beta1 as given"),
        (("optim.momentum", "optim.nesterov"), not sgd, "applies to the sgd optimizer"),
        (("optim.beta1", "optim.beta2", "optim.eps"), sgd, "applies to amsgrad and adam"),
        (("optim.bias_correction",), optim.name != "amsgrad", "applies to amsgrad"),
    ]
    if run is not None:
        rows += [
            (("data.data_dir",), run.data.dataset == "digits", "digits ships with "
             "scikit-learn"),
            (("checkpoint_every_s",), run.checkpoint is None, "applies with --checkpoint"),
            (("data.dirichlet_alpha",), run.data.partition != "dirichlet",
             "applies to --partition dirichlet"),
        ]
    return [(k, why) for keys, ignored, why in rows if ignored for k in keys if k in given]


class DataConfig(_Section):
    """Dataset, its per-worker partition and the per-worker mini-batch size."""

    dataset: str = _f("digits", "a built-in dataset (digits, fashion-mnist, mnist, cifar10: all "
                      "read from local files) or an import string 'package.module:function' "
                      "naming a function that returns (train, test) datasets",
                      "--dataset", "--data")
    data_dir: str | None = _f(None, "folder with dataset files (torchvision layout); "
                              "fashion-mnist also reads Debian's package", "--data-dir")
    partition: Partition = _f("iid", "how the training data is split over workers",
                              "--partition")
    dirichlet_alpha: float = _f(0.5, "Dirichlet concentration for partition dirichlet "
                                "(smaller = more skewed)", "--alpha", gt=0)
    batch_size: int = _f(32, "per-worker mini-batch size (syncps: the global batch, split "
                         "over the workers)", "--batch-size", ge=1, le=10**7)
    augment: Augment = _f("none", "training-batch augmentation of the built-in image data: "
                          "hflip mirrors each image left-right with probability 1/2 (for "
                          "classes that are mirror-symmetric, as in fashion-mnist and "
                          "cifar10; not for digits); a user's datasets augment in their "
                          "own transforms", "--augment")
    train_limit: int | None = _f(None, "use only the first N training samples",
                                 "--train-limit", ge=1)
    test_limit: int | None = _f(None, "use only the first N test samples", "--test-limit",
                                ge=1)
    num_workers: int = _f(0, "a user's datasets: DataLoader worker processes per worker",
                          ge=0, le=64)
    collate_fn: str | None = _f(None, "a user's datasets: the DataLoader's collate_fn, as an "
                                "import string")

    @model_validator(mode="after")
    def _names(self) -> DataConfig:
        _builtin_or_import("dataset", self.dataset, DATASETS)
        if self.collate_fn is not None:
            _builtin_or_import("collate_fn", self.collate_fn, ())
        return self


class NetworkConfig(_Section):
    """Emulated links: a transfer of ``B`` bytes between workers ``i`` and ``j`` (``-1`` is
    the master) sleeps ``latency + B / bandwidth`` where latency is ``latency_ms`` plus the
    larger of the two ends' extra latency (``worker_latency_ms``, ``master_latency_ms``)
    and bandwidth the smallest of ``bandwidth_gbps`` and the two ends' caps
    (``worker_bandwidth_gbps``, ``master_bandwidth_gbps``; 0 = unlimited).
    ``links`` overrides single links: ``[i, j, latency_ms, bandwidth_gbps]``. The
    simulator (:mod:`apam_gossip.sim`) also queues a node's concurrent transfers on its
    NIC, so a capped master NIC is where all centralized traffic waits.
    """

    latency_ms: float = _f(0.0, "latency of every link (ms)", ge=0, le=1e7)
    bandwidth_gbps: float = _f(0.0, "bandwidth of every link (Gbit/s, 0 = unlimited)", ge=0)
    worker_latency_ms: Floats = _f((), "extra latency of each worker's links (ms)")
    worker_bandwidth_gbps: Floats = _f((), "bandwidth cap of each worker's links (Gbit/s)")
    master_latency_ms: float = _f(0.0, "extra latency of the master's links (ms)", ge=0,
                                  le=1e7)
    master_bandwidth_gbps: float = _f(0.0, "bandwidth of the master's NIC (Gbit/s, 0 = "
                                      "unlimited)", ge=0)
    links: Links = _f((), "single links [i, j, latency_ms, bandwidth_gbps] (-1 = master)")

    @property
    def active(self) -> bool:
        return bool(self.latency_ms or self.bandwidth_gbps or any(self.worker_latency_ms)
                    or any(self.worker_bandwidth_gbps) or self.master_latency_ms
                or self.master_bandwidth_gbps or self.links)


class RunConfig(_Section):
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
    ``dpsgd`` (synchronous D-PSGD: every round each worker mixes its neighbors' models
    with Metropolis-Hastings weights, then takes a local step), and ``syncps`` (the APAM
    paper's synchronous AMSGrad with a parameter server: ``data.batch_size`` is the
    global batch, split over the workers; every step the master averages all their
    gradients, weighted by samples, takes one optimizer step and sends the model to all).

    Decentralized mode: ``topology`` is a generator name (``ring``, ``complete``, ...) or
    a graph file (see :mod:`apam_gossip.topology`); ``adaptive_state`` is ``local``
    (each worker's AMSGrad moments stay private) or ``tracked`` (DAMSGrad-style: a
    second-moment estimate is gossiped along with the parameters).

    Upper bounds keep every value inside what a run can represent (float32 parameters,
    ``time.sleep``, torch's thread pool, one machine's process table): past them a value
    is a typo, not a setting.
    """

    mode: Mode = _f("centralized", "centralized (APAM master/worker), decentralized "
                    "(gossip), sequential (one-process reference), allreduce, dpsgd or "
                    "syncps (synchronous baselines; syncps: a parameter server, the APAM "
                    "paper's comparator)")
    workers: int = _f(4, "number of workers (under mpirun: taken from the ranks; a real "
                      "run takes up to 4096, a simulation up to 100000)", ge=1, le=100_000)
    model: str = _f("mlp", "a built-in model (mlp, lenet5, allcnn) or an import string "
                    "'package.module:factory' naming a zero-argument function or class that "
                    "returns a torch.nn.Module")
    loss: str = _f("cross_entropy", "cross_entropy, mse, l1, or an import string naming "
                   "loss(output, target) -> scalar tensor")
    metric: str = _f("auto", "the test metric: accuracy (higher is better), loss (the "
                     "task's loss on the test set), mse, mae, rmse (lower is better), or an "
                     "import string naming metric(outputs, targets) -> float or a Metric; "
                     "auto: accuracy when the model outputs class scores for integer "
                     "labels, else loss")
    metric_higher_is_better: bool | None = _f(None, "which way the metric improves (default: "
                                              "the built-in metric's own; a user's function: "
                                              "higher)")
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    epochs: float = _f(1.0, "sample budget in passes over the training data", gt=0, le=1e6)
    steps: int | None = _f(None, "sample budget in model updates (instead of epochs)", ge=1,
                           le=10**12)
    seed: int = _f(0, "seed of the initial model, the data split and order", ge=0,
                   le=2**32 - 1)
    slowdown: Floats = _f((), "per worker: sleep (factor - 1) x its compute time after each "
                          "gradient (1 = full speed)")
    evals: int = _f(10, "number of test evaluations during the run", ge=1, le=100_000)
    eval_samples: int = _f(0, "score the evaluations during the run on the first N test "
                           "samples, the final one on all (0 = all every time)", ge=0)
    device: Device = _f("auto", "auto: cuda:(worker mod n_gpus) when CUDA is available")
    master_device: Device = _f("auto", "centralized, syncps: where the master keeps the model "
                               "and its AMSGrad state and applies updates (auto: the first "
                               "GPU when the workers are GPUs)")
    master_shards: int = _f(1, "centralized: K master processes, each owning a contiguous "
                            "slice of the model and of its optimizer state, to which "
                            "workers send that slice of each gradient (1 = one master)",
                            ge=1, le=1024)
    threads_per_worker: int | None = _f(None, "torch threads per worker (default: cores / "
                                        "workers)", ge=1, le=1024)
    transport: Transport = _f("auto", "auto: MPI when started by mpirun with several ranks, "
                              "else shared memory")
    timeout_s: float = _f(3600.0, "abort the run after this many seconds", "--timeout",
                          gt=0, le=1e8)
    topology: str = _f("ring", "decentralized/dpsgd: a graph file (see topologies/README.md) "
                       "or ring, torus, exponential, complete, star, regular:D, bipartite, "
                       "chain", min_length=1)
    adaptive_state: AdaptiveState = _f("local", "decentralized: local AMSGrad moments, or "
                                       "tracked (a second moment gossiped with the model)")
    overlap: bool | None = _f(None, "decentralized: average with the neighbor while the next "
                              "gradient is computed (AD-PSGD's two threads); --no-overlap: one "
                              "after the other (default: each worker times both ways over its "
                              "first steps and keeps the faster; \"auto\" in a file)")
    audit: bool = _f(False, "decentralized: check at the end that sum_i x_i = sum_i x_i(0) "
                     "+ all local steps")
    compress: str = _f("none", "decentralized: what an average sends, none (the models), "
                       "int8 (blockwise, 3.98x fewer bytes) or topk:F (the fraction F of "
                       "largest changes), with per-edge public copies that keep the sum of "
                       "the models and lose nothing over time (see "
                       "apam_gossip.core.compress)", min_length=1)
    compress_gamma: float | None = _f(None, "decentralized, compressed: the mixing step "
                                      "(default: 1 for int8, min(1, 3F) for topk:F)", gt=0,
                                      le=1)
    neighbour_choice: NeighbourChoice = _f("uniform", "decentralized: uniform (the "
                                           "topology's weights), or fast: prefer neighbours "
                                           "whose averages complete sooner (measured), "
                                           "every edge kept at a floor probability")
    straggler_prob: float = _f(0.0, "each gradient is a straggler with this probability",
                               ge=0, le=1)
    straggler_factor: float = _f(1.0, "... and then this many times slower", ge=1, le=1e6)
    network: NetworkConfig = Field(default_factory=NetworkConfig)
    checkpoint: str | None = _f(None, "centralized and decentralized: write a checkpoint "
                                "here periodically and on SIGTERM/Ctrl-C (atomic)")
    checkpoint_every_s: float = _f(60.0, "seconds between checkpoints", "--checkpoint-every",
                                   gt=0, le=1e8)

    @field_validator("compress", mode="before")
    @classmethod
    def _compress_spelling(cls, v: Any) -> Any:
        return v.strip().lower() if isinstance(v, str) else v

    @field_validator("overlap", mode="before")
    @classmethod
    def _overlap_auto(cls, v: Any) -> Any:
        # TOML has no null: "auto" is how a file asks for the measured default
        return None if v == "auto" else v

    @property
    def known_metric(self) -> str:
        """The metric as far as the config alone tells: ``auto`` with a built-in model (a
        classifier) is ``accuracy``; with a user's model it stays ``auto`` until
        :func:`apam_gossip.task.make_task` has seen the model's outputs."""
        return "accuracy" if self.metric == "auto" and self.model in MODELS else self.metric

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        """The rules that tie several fields together."""
        _builtin_or_import("model", self.model, MODELS)
        _builtin_or_import("loss", self.loss, LOSSES)
        _builtin_or_import("metric", self.metric, METRICS)
        if self.adaptive_state == "tracked" and self.optim.name != "amsgrad":
            raise _rule("adaptive_state", f"tracked needs optim.name amsgrad, got "
                        f"{self.optim.name!r}")
        if len(self.slowdown) > self.workers:
            raise _rule("slowdown", f"has {len(self.slowdown)} entries but there are only "
                        f"{self.workers} workers")
        for i, s in enumerate(self.slowdown):
            if not 1.0 <= s <= 1e6:
                raise _rule(f"slowdown[{i}]", f"must be in [1, 1e6] (1 = full speed), got {s:g}")
        from .core.compress import parse_compress  # (torch: not at the CLI's import)

        try:
            comp = parse_compress(self.compress)
        except ValueError as e:
            raise _rule("compress", str(e).removeprefix("compress ").removeprefix(
                f"{self.compress!r}: ")) from None
        if comp is not None and self.adaptive_state == "tracked" \
                and self.mode == "decentralized":
            raise _rule("compress", "a compressed average moves the models only: use "
                        "adaptive_state local (the tracked second moment is averaged "
                        "exactly)")
        if self.checkpoint is not None and self.mode not in ASYNC_MODES:
            raise _rule("checkpoint", "only the centralized and decentralized modes write "
                        f"checkpoints so far (mode is {self.mode})")
        net = self.network
        for name in ("worker_latency_ms", "worker_bandwidth_gbps"):
            vals = getattr(net, name)
            if len(vals) > self.workers:
                raise _rule(f"network.{name}", f"has {len(vals)} entries but there are only "
                            f"{self.workers} workers")
            for i, v in enumerate(vals):
                if not 0 <= v <= 1e7:
                    raise _rule(f"network.{name}[{i}]", f"must be in [0, 1e7], got {v:g}")
        for k, link in enumerate(net.links):
            if len(link) != 4:
                raise _rule(f"network.links[{k}]", "must be [i, j, latency_ms, "
                            f"bandwidth_gbps], got {list(link)}")
            i, j, lat, bw = link
            for end in (i, j):
                if end != int(end) or not -1 <= end < self.workers:
                    raise _rule(f"network.links[{k}]", f"{end:g} is not a worker "
                                f"(0..{self.workers - 1}) or -1 (the master)")
            if not (0 <= lat <= 1e7 and bw >= 0):
                raise _rule(f"network.links[{k}]", "latency must be in [0, 1e7] and "
                            "bandwidth >= 0")
        return self

    # -- construction -------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Any) -> RunConfig:
        """Build and validate a config from nested plain data (file or JSON result)."""
        if not isinstance(d, dict):
            raise ConfigError(f"config must be a table, got {_short(d)}", "config")
        try:
            return cls.model_validate(d)
        except ValidationError as e:
            raise config_error(e, cls) from None

    def to_dict(self) -> dict[str, Any]:
        """Plain nested data (lists, not tuples): JSON and TOML as they are read."""
        return json.loads(self.model_dump_json())

    def replace(self, **changes: Any) -> RunConfig:
        """A copy with top-level fields changed; ``data``/``optim``/``network`` may be
        dicts of the keys to change."""
        return RunConfig.from_dict(merge(self.to_dict(), changes))

    def validate(self) -> None:  # type: ignore[override]
        """Raise :class:`ConfigError` if invalid (a constructed config always is valid;
        kept for callers that check explicitly)."""
        RunConfig.from_dict(self.to_dict())

    def for_workers(self, n: int) -> RunConfig:
        """This config with ``n`` workers, its per-worker settings (``slowdown``,
        ``network.worker_*``, ``network.links``) cut to workers ``0..n-1``: a checkpoint
        resumed under mpirun with fewer ranks (more ranks need nothing cut)."""
        net = self.network
        return self.replace(
            workers=n, slowdown=list(self.slowdown[:n]),
            network={"worker_latency_ms": list(net.worker_latency_ms[:n]),
                     "worker_bandwidth_gbps": list(net.worker_bandwidth_gbps[:n]),
                     "links": [list(link) for link in net.links
                               if link[0] < n and link[1] < n]})

    def slowdown_of(self, worker: int) -> float:
        return self.slowdown[worker] if worker < len(self.slowdown) else 1.0


# -- errors -------------------------------------------------------------------------------
class _Rule(ValueError):
    def __init__(self, key: str, problem: str) -> None:
        super().__init__(problem)
        self.key, self.problem = key, problem


def _rule(key: str, problem: str) -> _Rule:
    return _Rule(key, problem)


def _short(v: Any, limit: int = 60) -> str:
    s = repr(v)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _num(v: Any) -> str:
    """A bound as a person writes it: 4294967295, 1e+08, 0.5."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return str(int(v)) if float(v).is_integer() and abs(v) < 1e13 else f"{v:g}"
    return str(v)


def _section_of(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The model class that holds the key at ``loc`` (for "valid keys" and did-you-mean)."""
    cls: Any = model
    for part in loc[:-1]:
        field = cls.model_fields.get(part) if isinstance(part, str) else None
        if field is None or not (isinstance(field.annotation, type)
                                 and issubclass(field.annotation, BaseModel)):
            return None
        cls = field.annotation
    return cls


def config_error(e: ValidationError, model: type[BaseModel]) -> ConfigError:
    """The first problem of a pydantic error as one line naming the key."""
    err = e.errors(include_url=False)[0]
    loc = tuple(err.get("loc", ()))
    key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    typ, ctx, value = err.get("type", ""), err.get("ctx") or {}, err.get("input")
    got = f", got {_short(value)}"
    inner = ctx.get("error")
    if typ == "value_error" and isinstance(inner, (_Rule, ConfigError)) and inner.problem:
        # a rule of the model at ``loc``, or the error of a nested section (pydantic runs
        # the sections' own __init__, which raises ConfigError): prefix its key with loc
        full = ".".join(k for k in (key, inner.key) if k)
        return _error(full, inner.problem)
    if typ == "extra_forbidden":
        section = _section_of(model, loc)
        valid = sorted(section.model_fields) if section is not None else []
        near = difflib.get_close_matches(str(loc[-1]), valid, n=1)
        hint = f"did you mean {near[0]}? " if near else ""
        return _error(key, f"{UNKNOWN_KEY}; {hint}valid keys: {', '.join(valid)}")
    bounds = {"greater_than": ("gt", ">"), "greater_than_equal": ("ge", ">="),
              "less_than": ("lt", "<"), "less_than_equal": ("le", "<=")}
    if typ in bounds:
        name, op = bounds[typ]
        problem = f"must be {op} {_num(ctx.get(name))}{got}"
    elif typ == "literal_error":
        problem = f"must be one of {ctx.get('expected', '').replace(chr(39), '')}{got}"
    elif typ in ("int_type", "int_from_float"):
        problem = f"must be an integer{got}"
    elif typ in ("float_type", "float_parsing"):
        problem = f"must be a number{got}"
    elif typ == "finite_number":
        problem = f"must be finite{got}"
    elif typ == "bool_type":
        # overlap is the one setting with a third, measured value
        also = ' or "auto" (measured; the default)' if loc and loc[-1] == "overlap" else ""
        problem = f"must be true or false{also}{got}"
    elif typ == "string_type":
        problem = f"must be a string{got}"
    elif typ == "string_too_short":
        problem = f"must not be empty{got}"
    elif typ in ("tuple_type", "list_type"):
        problem = f"must be a list{got}"
    elif typ in ("model_type", "model_attributes_type", "dict_type"):
        problem = f"must be a table{got}"
    elif typ == "missing":
        problem = "is required"
    else:
        problem = f"{err.get('msg', 'is invalid')}{got}"
    return _error(key, problem)


UNKNOWN_KEY = "is not a config key"


def _error(key: str, problem: str) -> ConfigError:
    if problem.startswith(UNKNOWN_KEY):
        return ConfigError(f"unknown config key {key}{problem[len(UNKNOWN_KEY):]}", key,
                           problem)
    return ConfigError(f"{key} {problem}", key, problem)


# -- files ---------------------------------------------------------------------------------
def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read a TOML (``.toml``) or JSON (``.json``) config file, apply ``overrides``.

    Overrides are nested dicts like the file (``{"optim": {"lr": 0.01}}``). A RunResult
    JSON is accepted too: its config is rerun.
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
    try:
        return RunConfig.from_dict(merge(d, overrides or {}))
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}", e.key, e.problem) from None


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``over``, nested tables merged key by key."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def to_toml(d: dict[str, Any]) -> str:
    """``d`` (a config's plain data) as TOML that :func:`load_config` reads back; None
    values are left out (they are the defaults)."""
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(v)

    lines = [f"{k} = {value(v)}" for k, v in d.items() if v is not None and not isinstance(v, dict)]
    for k, v in d.items():
        if isinstance(v, dict):
            lines += ["", f"[{k}]"] + [f"{kk} = {value(vv)}" for kk, vv in v.items()
                                       if vv is not None]
    return "\n".join(lines) + "\n"


# -- the schema, walked (for the command line and the profiles' short keys) -----------------
class FieldSpec:
    """One leaf key of the schema: its dotted ``path``, type, default, help and aliases."""

    @property
    def is_bool(self) -> bool:
        """A switch (``bool``, or ``bool | None`` where None means "the default")."""
        return self.annotation is bool or set(get_args(self.annotation)) == {bool, type(None)}

    def __init__(self, path: str, annotation: Any, default: Any, help: str,
                 flags: list[str]) -> None:
        self.path, self.annotation, self.default, self.help, self.flags = (
            path, annotation, default, help, flags)

    @property
    def choices(self) -> tuple[Any, ...] | None:
        args = get_args(self.annotation)
        return args if args and all(isinstance(a, str) for a in args) else None

    @property
    def flag(self) -> str:
        """The long flag: the key with dashes, sections joined by dots."""
        return "--" + self.path.replace("_", "-")


def schema_fields(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[FieldSpec]:
    """Every leaf key of ``model`` in declaration order (sections flattened)."""
    out: list[FieldSpec] = []
    for name, f in model.model_fields.items():
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += schema_fields(ann, f"{prefix}{name}.")
            continue
        extra = f.json_schema_extra if isinstance(f.json_schema_extra, dict) else {}
        flags = list(extra.get("flags", []))  # type: ignore[arg-type]
        out.append(FieldSpec(prefix + name, ann, f.get_default(call_default_factory=True),
                             f.description or "", flags))
    return out


def short_keys() -> dict[str, str]:
    """The short aliases as plain keys (``lr`` -> ``optim.lr``, ``batch_size`` ->
    ``data.batch_size``): what a profile's [run] table may use besides the full keys."""
    return {a.lstrip("-").replace("-", "_"): spec.path for spec in schema_fields()
            for a in spec.flags}


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"optim.lr": 0.1, "workers": 2}`` -> ``{"optim": {"lr": 0.1}, "workers": 2}``."""
    out: dict[str, Any] = {}
    for path, v in flat.items():
        *parents, leaf = path.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out
