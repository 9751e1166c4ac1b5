"""What is trained: the model, the loss and the metric, as one value (:class:`Task`) that
flows from :func:`apam_gossip.run` down to every process.

A user brings their own, or keeps the built-in ones:

* **model**: a built-in name (``mlp``, ``lenet5``, ``allcnn``), an import string
  ``"package.module:attribute"`` naming a zero-argument factory (or an ``nn.Module``
  class), or, from Python, any zero-argument callable returning an ``nn.Module``
  (a function, a class, a ``functools.partial``);
* **loss**: ``cross_entropy`` (default), ``mse``, ``l1``, an import string, or a callable
  ``loss(output, target) -> scalar tensor``;
* **metric**: ``auto`` (default: ``accuracy`` when the model outputs class scores,
  ``[N, C]`` with C >= 2 for integer labels ``[N]``, else ``loss``, as Keras and
  Lightning report val_loss), ``accuracy`` (higher is better), ``loss`` (the task's own
  loss over the test set), ``mse``, ``mae``, ``rmse`` (lower is better), an import string,
  a :class:`Metric`, or a callable ``metric(outputs, targets) -> float`` over the whole
  test set (then ``higher_is_better`` says which way is better). ``auto`` is settled by
  :func:`make_task` on two training samples, before anything trains.

Every process builds the model from the same seed, so parameters it does not train
(``requires_grad=False``) and buffers start identical everywhere. Callables defined in the
user's own script (``__main__``) travel to spawned workers by value (cloudpickle); those
in importable modules by reference.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import cloudpickle
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import RunConfig
from .data import import_user_object
from .errors import UserError
from .flat import flatten
from .imports import describe_object, first_line
from .models import MODELS, build_model

BUILTIN_LOSSES: tuple[str, ...] = ("cross_entropy", "mse", "l1")


# ------------------------------------------------------------------------------- metrics
@dataclass(frozen=True)
class Metric:
    """A test-set measure: ``fn(outputs, targets)`` over the whole test set (all batches
    concatenated), and whether higher is better."""

    name: str
    fn: Callable[[Tensor, Tensor], Any]
    higher_is_better: bool = True

    def __call__(self, outputs: Tensor, targets: Tensor) -> float:
        value = self.fn(outputs, targets)
        return float(value.item() if isinstance(value, Tensor) else value)

    def better(self, value: float, target: float) -> bool:
        """``value`` reaches ``target`` (>= when higher is better, <= otherwise)."""
        return value >= target if self.higher_is_better else value <= target


def _aligned(outputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """outputs [N, 1] against targets [N] (a regression head) compare elementwise."""
    if outputs.shape != targets.shape and outputs.numel() == targets.numel():
        outputs = outputs.reshape(targets.shape)
    return outputs.float(), targets.float()


def accuracy(outputs: Tensor, targets: Tensor) -> float:
    return float((outputs.argmax(1) == targets).float().mean())


def mean_squared_error(outputs: Tensor, targets: Tensor) -> float:
    o, t = _aligned(outputs, targets)
    return float(((o - t) ** 2).mean())


def mean_absolute_error(outputs: Tensor, targets: Tensor) -> float:
    o, t = _aligned(outputs, targets)
    return float((o - t).abs().mean())


def root_mean_squared_error(outputs: Tensor, targets: Tensor) -> float:
    return math.sqrt(mean_squared_error(outputs, targets))


BUILTIN_METRICS: dict[str, Metric] = {
    "accuracy": Metric("accuracy", accuracy, True),
    "mse": Metric("mse", mean_squared_error, False),
    "mae": Metric("mae", mean_absolute_error, False),
    "rmse": Metric("rmse", root_mean_squared_error, False),
}


def mse_loss(output: Tensor, target: Tensor) -> Tensor:
    o, t = _aligned(output, target)
    return F.mse_loss(o, t)


def l1_loss(output: Tensor, target: Tensor) -> Tensor:
    o, t = _aligned(output, target)
    return F.l1_loss(o, t)


_LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "cross_entropy": F.cross_entropy, "mse": mse_loss, "l1": l1_loss}


# ---------------------------------------------------------------------------------- task
@dataclass(frozen=True)
class Task:
    """The model, loss and metric of a run (see the module docstring).

    ``in_shape``/``n_classes`` are what a built-in model is built for (taken from the
    data); a user's factory takes no arguments."""

    model: Any = "mlp"
    loss: Any = "cross_entropy"
    metric: Any = "accuracy"  # "auto" is settled by make_task
    higher_is_better: bool | None = None
    seed: int = 0
    in_shape: tuple[int, ...] | None = None
    n_classes: int | None = None
    _cache: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def of(cls, cfg: RunConfig, in_shape: tuple[int, ...] | None = None,
           n_classes: int | None = None, *, model: Any = None, loss: Any = None,
           metric: Any = None) -> Task:
        """The task of ``cfg``; ``model``/``loss``/``metric`` objects (the Python API)
        replace the config's names."""
        task = cls(model if model is not None else cfg.model,
                   loss if loss is not None else cfg.loss,
                   metric if metric is not None else cfg.metric,
                   cfg.metric_higher_is_better, cfg.seed, in_shape, n_classes)
        task.metric_obj()  # a bad metric is reported now, not after training
        task.loss_fn()
        return task

    def with_seed(self, seed: int) -> Task:
        return replace(self, seed=seed, _cache={})

    # -- the parts ------------------------------------------------------------------
    @property
    def model_name(self) -> str:
        return describe_object(self.model)

    def model_factory(self) -> Callable[[], nn.Module]:
        if "factory" not in self._cache:
            spec = self.model
            if isinstance(spec, str) and spec in MODELS:
                if self.in_shape is None or self.n_classes is None:
                    raise UserError(f"the built-in model {spec!r} needs image data with class "
                                    "labels (an input shape and a number of classes)")
                in_shape, n_classes = self.in_shape, self.n_classes
                self._cache["factory"] = lambda: build_model(spec, in_shape, n_classes)
            elif isinstance(spec, str):
                self._cache["factory"] = import_user_object(spec, "model")
            else:
                self._cache["factory"] = spec
            factory = self._cache["factory"]
            if not callable(factory):
                raise UserError(f"model {self.model_name}: a {type(factory).__name__} is not "
                                "callable; give a zero-argument function or class that "
                                "returns a torch.nn.Module")
        return self._cache["factory"]

    def build_model(self) -> nn.Module:
        """The model, built from the run's seed (the same in every process)."""
        factory = self.model_factory()
        torch.manual_seed(self.seed)
        try:
            model = factory()
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - a failing user factory is a user error
            raise UserError(f"model {self.model_name} raised {type(e).__name__}: "
                            f"{first_line(e)}") from None
        if not isinstance(model, nn.Module):
            raise UserError(f"model {self.model_name} returned {type(model).__name__}, not "
                            "a torch.nn.Module")
        return model

    def initial_state(self) -> tuple[Tensor, int]:
        """The seeded initial state vector ``[params | buffers]`` (on the CPU) and how many
        of its entries are trainable parameters."""
        flat = flatten(self.build_model(), "cpu", who=f"model {self.model_name}")
        return flat.state.clone(), flat.n_params

    def loss_fn(self) -> Callable[[Tensor, Tensor], Tensor]:
        if "loss" not in self._cache:
            spec = self.loss
            if isinstance(spec, str) and spec in _LOSSES:
                fn = _LOSSES[spec]
            elif isinstance(spec, str):
                fn = import_user_object(spec, "loss")
            else:
                fn = spec
            if not callable(fn):
                raise UserError(f"loss {describe_object(spec)} is not callable; give "
                                "loss(output, target) -> scalar tensor")
            self._cache["loss"] = fn
        return self._cache["loss"]

    def metric_obj(self) -> Metric:
        if "metric" not in self._cache:
            spec = self.metric
            if spec == "auto":  # settled by make_task, which sees the model's outputs
                m = BUILTIN_METRICS["accuracy"]
            elif spec == "loss":
                m = Metric("loss", self._test_loss, False)
            elif isinstance(spec, str) and spec in BUILTIN_METRICS:
                m = BUILTIN_METRICS[spec]
            elif isinstance(spec, Metric):
                m = spec
            else:
                obj = import_user_object(spec, "metric") if isinstance(spec, str) else spec
                if isinstance(obj, Metric):
                    m = obj
                elif callable(obj):
                    name = spec if isinstance(spec, str) else describe_object(obj)
                    m = Metric(name, obj, True)
                else:
                    raise UserError(f"metric {describe_object(spec)} is not callable; give "
                                    "metric(outputs, targets) -> float or a Metric")
            if self.higher_is_better is not None:
                m = Metric(m.name, m.fn, self.higher_is_better)
            self._cache["metric"] = m
        return self._cache["metric"]

    def _test_loss(self, outputs: Tensor, targets: Tensor) -> float:
        """The ``loss`` metric: the task's loss over the whole test set."""
        return float(self.loss_fn()(outputs, targets).detach())

    def describe(self) -> dict[str, Any]:
        """What a RunResult records of the task."""
        m = self.metric_obj()
        return {"model": self.model_name, "loss": describe_object(self.loss),
                "metric": m.name, "higher_is_better": m.higher_is_better}

    # -- transport to spawned processes ------------------------------------------------
    def __reduce__(self):
        # by value where needed: a factory or loss defined in the user's script (__main__)
        # does not exist in a spawned worker; cloudpickle carries it (importable ones still
        # travel by reference)
        fields = (self.model, self.loss, self.metric, self.higher_is_better, self.seed,
                  self.in_shape, self.n_classes)
        return _task_from_bytes, (cloudpickle.dumps(fields),)


def _task_from_bytes(data: bytes) -> Task:
    return Task(*cloudpickle.loads(data))


def compute_loss(task: Task, model: nn.Module, x: Any, y: Any, who: str) -> Tensor:
    """``task``'s loss of ``model`` on one batch, checked to be a scalar."""
    loss = task.loss_fn()(model(x), y)
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        shape = list(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise UserError(f"{who}: loss {describe_object(task.loss)} returned {shape}, not a "
                        "scalar tensor (reduce it, e.g. .mean())")
    return loss


def make_task(cfg: RunConfig, data: Any, *, model: Any = None, loss: Any = None,
              metric: Any = None, check: bool = True) -> Task:
    """The run's :class:`~apam_gossip.task.Task`; with ``check``, tried on two training
    samples (see :func:`~apam_gossip.task.preflight`) before any process starts."""
    spec = model if model is not None else cfg.model
    builtin = isinstance(spec, str) and spec in MODELS
    task = Task.of(cfg, data.in_shape if builtin else None,
                   data.n_classes if builtin else None, model=model, loss=loss, metric=metric)
    if isinstance(task.metric, str) and task.metric == "auto":
        task = replace(task, metric=auto_metric(task, data), _cache={})
    if check:
        preflight(task, data)
    return task


def auto_metric(task: Task, data: Any) -> str:
    """``accuracy`` when ``task``'s model gives class scores (``[N, C]``, C >= 2) for
    integer labels (``[N]``) on two training samples of ``data``, else ``loss``. A model
    that fails here is left to :func:`preflight` to report."""
    try:
        model = task.build_model()
        x, y = data.first_batch(2)
        model.eval()
        with torch.no_grad():
            out = model(x)
    except Exception:  # noqa: BLE001 - preflight names it, with context
        return "accuracy"
    scores = isinstance(out, Tensor) and out.dim() == 2 and out.shape[1] >= 2
    labels = isinstance(y, Tensor) and y.dim() == 1 and not y.is_floating_point() \
        and not y.is_complex() and y.dtype != torch.bool and len(y) == len(out)
    return "accuracy" if scores and labels else "loss"


def preflight(task: Task, data: Any) -> None:
    """Build the model and push two training samples through it, the loss, a backward
    pass and the metric, in this process, before any worker starts: a factory that
    fails, a model that does not take the data, a loss that is not a scalar or a metric
    that fails is one line (a :class:`UserError`) now rather than a worker's traceback."""
    model = task.build_model()
    flat = flatten(model, "cpu", who=f"model {task.model_name}")
    x, y = data.first_batch(2)
    model.train()
    try:
        out = model(x)
    except Exception as e:  # noqa: BLE001 - the user's model on the user's data
        raise UserError(f"model {task.model_name} cannot take a batch of {data.name} "
                        f"(inputs {_shape(x)}): {type(e).__name__}: {first_line(e)}") from None
    try:
        loss = task.loss_fn()(out, y)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"loss {describe_object(task.loss)} fails on the model's output "
                        f"{_shape(out)} and targets {_shape(y)}: {type(e).__name__}: "
                        f"{first_line(e)}") from None
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        got = list(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise UserError(f"loss {describe_object(task.loss)} returned {got}, not a scalar "
                        "tensor (reduce it, e.g. .mean())")
    loss.backward()
    flat.check_gradients(f"model {task.model_name}")
    metric = task.metric_obj()
    try:
        value = metric(out.detach(), y)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"metric {metric.name} fails on the model's output {_shape(out)} "
                        f"and targets {_shape(y)}: {type(e).__name__}: {first_line(e)}") from None
    if not isinstance(value, float):
        raise UserError(f"metric {metric.name} returned {type(value).__name__}, not a number")


def _shape(v: Any) -> str:
    return str(list(v.shape)) if isinstance(v, Tensor) else type(v).__name__
