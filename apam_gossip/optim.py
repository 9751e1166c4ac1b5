"""Pure optimizer math on flat tensors with explicit state.

Every step function updates ``param`` and its state tensors **in place** and is a
function of its arguments only (no hidden state), like torch's functional ``adam``.
:class:`Optimizer` pairs ``init`` (make the state) with ``update`` (one step), like
optax's ``init``/``update``; the state is a plain ``dict[str, Tensor]`` so it can live
in shared memory, cross a transport or go into a checkpoint unchanged.

AMSGrad comes in two named variants (``bias_correction``):

* **paper** (``bias_correction=False``), the update analysed in the APAM paper::

      m = b1*m + (1-b1)*g;   v = b2*v + (1-b2)*g*g;   vhat = max(vhat, v)
      x = x - lr * m / (sqrt(vhat) + eps)

  The paper has no ``eps``; ``eps=0`` gives its exact update (a coordinate whose
  ``vhat`` is 0 has ``m`` = 0 too and is left unchanged instead of becoming NaN).
* **practical** (``bias_correction=True``), identical to
  ``torch.optim.Adam(amsgrad=True)``: the running max is taken of the *uncorrected*
  ``v`` and the bias corrections are applied afterwards::

      vhat = max(vhat, v)
      x = x - lr/(1-b1^t) * m / (sqrt(vhat)/sqrt(1-b2^t) + eps)

  (optax's ``scale_by_amsgrad`` takes the max of the *corrected* v; that differs.)

For decentralized training, :func:`damsgrad_step` is AMSGrad with a *tracked* second
moment ``u`` (DAMSGrad, Chen et al., arXiv 2109.03194): ``u`` is gossiped (averaged with
neighbors together with ``x``) and, at each local step, moved by the change of the local
running max, ``u += vhat_new - vhat_old``, so its network average tracks the average
``vhat``; the step divides by ``sqrt(max(u, 0))`` in place of ``sqrt(vhat)``.

Weight decay is the classic L2 form (``g = g + wd*x``) as in ``torch.optim.Adam``.
``step`` counts updates already applied, starting from 0 in a fresh state.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .config import OptimConfig

OptState = dict[str, Tensor]



def scheduled_lr(lr: float, schedule: str, step: int, total: int,
                 warmup: float = 0.0) -> float:
    """The learning rate of update ``step`` (1-based) of ``total``: ``constant``; ``cosine``
    decays from ``lr`` towards 0 along half a cosine; ``linear`` decays linearly. The
    decay ends one step past ``total``, so the last update still moves the model.
    ``warmup``: the first ``warmup x total`` updates ramp linearly from ``lr / W`` up to
    the schedule's value (``W`` = the warm-up's length in updates): with many
    asynchronous workers, the first gradients are all computed at the starting point,
    and a full-size step for each of them overshoots."""
    scale = 1.0
    if warmup > 0 and total > 0:
        length = max(1.0, warmup * total)
        scale = min(1.0, step / length)
    if schedule == "constant" or total <= 0:
        return lr * scale
    frac = min(max(step - 1, 0) / total, 1.0)
    if schedule == "cosine":
        return scale * lr * 0.5 * (1.0 + math.cos(math.pi * frac))
    if schedule == "linear":
        return scale * lr * (1.0 - frac)
    raise AssertionError(f"unknown schedule {schedule!r}")


def staleness_scale(rule: str, staleness: int) -> float:
    """The factor on the learning rate of a gradient ``staleness`` updates old (the
    staleness-aware step of asynchronous SGD, Zhang et al. 2016, arXiv 1511.05950):
    ``none`` 1; ``sqrt`` 1/sqrt(1 + tau); ``inverse`` 1/(1 + tau)."""
    if rule == "none" or staleness <= 0:
        return 1.0
    if rule == "sqrt":
        return 1.0 / math.sqrt(1.0 + staleness)
    if rule == "inverse":
        return 1.0 / (1.0 + staleness)
    raise AssertionError(f"unknown staleness rule {rule!r}")


def staleness_momentum(rule: str, decay: float, workers: int) -> float:
    """The first-moment decay (AMSGrad/Adam ``beta1``) an asynchronous master fed by
    ``workers`` workers uses in place of ``decay``.

    Asynchrony begets momentum (Mitliagkas et al. 2016, arXiv 1605.09774): with n workers
    every gradient is about n - 1 updates stale, so it keeps pushing the model where it
    was going n updates ago, an implicit momentum of about 1 - 1/n on top of the explicit
    one. ``none``: ``decay`` as given (the APAM paper). ``workers``: 1 - (1 - decay) n,
    floored at 0: the explicit window 1 / (1 - beta) shrinks n times, so explicit and
    implicit together stay near the sequential run's (one worker: unchanged). Measured on
    8 workers with one 10x slower (BENCHMARKS.md): beta1 0.9 -> 0.2 cut APAM's epochs to
    85% from 1.40 to 0.92."""
    if rule == "none" or workers <= 1:
        return decay
    if rule == "workers":
        return max(0.0, 1.0 - (1.0 - decay) * workers)
    raise AssertionError(f"unknown staleness momentum rule {rule!r}")


def gossip_lr_factor(rule: str, workers: int) -> float:
    """The factor on a gossip worker's learning rate. The models' average moves by 1/n of
    each local step, so n gossip workers make the progress of one sequential run with an
    n-times larger batch at 1/n of its step. ``sqrt`` multiplies the lr by sqrt(n), the
    square-root scaling rule of Adam-type steps (Malladi et al. 2022, arXiv 2205.10287);
    ``workers`` by n, the linear rule of large-batch SGD; ``none`` (the default, so that
    every mode of a comparison gets the same lr) leaves it as given. Simulated on LeNet5 /
    Fashion-MNIST on a ring (BENCHMARKS.md): ``sqrt`` beats ``none`` at 16 and 32
    workers; ``workers`` is best at 8 and 16 and falls below ``none`` at 32."""
    if rule == "none" or workers <= 1:
        return 1.0
    if rule == "sqrt":
        return math.sqrt(workers)
    if rule == "workers":
        return float(workers)
    raise AssertionError(f"unknown gossip lr rule {rule!r}")


def for_async_master(hp: OptimConfig, workers: int) -> OptimConfig:
    """``hp`` as an asynchronous master fed by ``workers`` workers applies it: AMSGrad's
    and Adam's ``beta1`` by :func:`staleness_momentum`, unless ``lookahead`` is on (it
    handles staleness by following the momentum). SGD's momentum is left as given:
    a momentum shortened to 0 would drop the momentum buffer from the optimizer state, so
    a checkpoint would depend on the number of workers (and the rule is measured on
    AMSGrad only)."""
    rule = hp.staleness_momentum
    # lookahead follows the explicit momentum's course instead of shortening it (with the
    # rule's short window the step it would follow is one noisy gradient's)
    if rule == "none" or workers <= 1 or hp.name == "sgd" or hp.lookahead > 0:
        return hp
    return hp.model_copy(update={"beta1": staleness_momentum(rule, hp.beta1, workers)})


def lookahead_point(out: Tensor, param: Tensor, state: OptState, hp: OptimConfig, lr: float,
                    updates: float) -> Tensor:
    """``out`` <- ``param`` moved ``updates`` steps of size ``lr`` along the current
    AMSGrad/Adam update direction ``m / (sqrt(vhat) + eps)`` (bias-corrected as the step
    is), i.e. about where the model will be ``updates`` updates from now if it keeps its
    course. An asynchronous master hands this point to a worker whose gradient will land
    ``updates`` updates later, so the gradient is taken near where it is applied (DANA,
    Hakimi et al. 2019, arXiv 1906.07405, does this with SGD's momentum). A fresh state
    (no step yet), SGD, or ``updates`` 0: ``param`` as it is."""
    out.copy_(param)
    step = int(state["step"]) if "step" in state else 0
    if updates <= 0 or step == 0 or hp.name == "sgd":
        return out
    # the step itself, ``updates`` times as long, from the state as it is now
    second = state["vhat"] if hp.name == "amsgrad" else state["v"]
    _adaptive_update(out, state["m"], second.clone(), step=step, lr=lr * updates,
                     beta1=hp.beta1, beta2=hp.beta2, eps=hp.eps,
                     bias_correction=hp.name == "adam" or hp.bias_correction)
    return out


def _moments(param: Tensor, grad: Tensor, m: Tensor, v: Tensor, beta1: float, beta2: float,
             weight_decay: float) -> None:
    """m, v <- exponential moving averages of g and g^2 (with L2 weight decay in g)."""
    if weight_decay:
        grad = grad.add(param, alpha=weight_decay)
    m.lerp_(grad, 1 - beta1)
    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)


def _adaptive_update(param: Tensor, m: Tensor, second: Tensor, *, step: int, lr: float,
                     beta1: float, beta2: float, eps: float, bias_correction: bool) -> None:
    """x <- x - lr * m / (sqrt(second) + eps), bias-corrected as torch does when asked.

    ``second`` is overwritten (it is a temporary or a clone)."""
    root = second.sqrt_()
    if bias_correction:
        denom = root.div_(math.sqrt(1 - beta2**step)).add_(eps)
        param.addcdiv_(m, denom, value=-lr / (1 - beta1**step))
    else:
        denom = root.add_(eps)
        if eps == 0:
            denom.masked_fill_(denom == 0, 1.0)  # m is 0 wherever the second moment is 0
        param.addcdiv_(m, denom, value=-lr)


def amsgrad_step(
    param: Tensor,
    grad: Tensor,
    m: Tensor,
    v: Tensor,
    vhat: Tensor,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    bias_correction: bool,
    weight_decay: float = 0.0,
) -> None:
    """One AMSGrad step in place; ``step`` is the 1-based index of this update."""
    _moments(param, grad, m, v, beta1, beta2, weight_decay)
    torch.maximum(vhat, v, out=vhat)
    _adaptive_update(param, m, vhat.clone(), step=step, lr=lr, beta1=beta1, beta2=beta2,
                     eps=eps, bias_correction=bias_correction)


def damsgrad_step(
    param: Tensor,
    grad: Tensor,
    m: Tensor,
    v: Tensor,
    vhat: Tensor,
    u: Tensor,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    bias_correction: bool,
    weight_decay: float = 0.0,
) -> None:
    """One AMSGrad step with a tracked (gossiped) second moment ``u``, in place.

    Same as :func:`amsgrad_step` (same two variants) except that the denominator uses
    ``u``, and ``u`` is first moved by this worker's change of ``vhat``.
    """
    _moments(param, grad, m, v, beta1, beta2, weight_decay)
    u.sub_(vhat)
    torch.maximum(vhat, v, out=vhat)
    u.add_(vhat)
    _adaptive_update(param, m, u.clamp(min=0), step=step, lr=lr, beta1=beta1, beta2=beta2,
                     eps=eps, bias_correction=bias_correction)


def adam_step(
    param: Tensor,
    grad: Tensor,
    m: Tensor,
    v: Tensor,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float = 0.0,
) -> None:
    """One Adam step in place (bias-corrected, as ``torch.optim.Adam``)."""
    _moments(param, grad, m, v, beta1, beta2, weight_decay)
    _adaptive_update(param, m, v.clone(), step=step, lr=lr, beta1=beta1, beta2=beta2,
                     eps=eps, bias_correction=True)


def sgd_step(
    param: Tensor,
    grad: Tensor,
    buf: Tensor | None,
    *,
    step: int,
    lr: float,
    momentum: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
) -> None:
    """One SGD step in place, momentum as ``torch.optim.SGD`` (dampening 0).

    ``buf`` is the momentum buffer (ignored when ``momentum == 0``); on the first step it
    is set to the gradient, as torch does.
    """
    if weight_decay:
        grad = grad.add(param, alpha=weight_decay)
    if momentum:
        assert buf is not None
        if step == 1:
            buf.copy_(grad)
        else:
            buf.mul_(momentum).add_(grad)
        grad = grad.add(buf, alpha=momentum) if nesterov else buf
    param.add_(grad, alpha=-lr)


class Optimizer:
    """An init/update pair over flat tensors.

    Its hyper-parameters are an :class:`~apam_gossip.config.OptimConfig` (the same record
    a run's config holds, so they are declared once): ``Optimizer(cfg.optim)``, or
    ``Optimizer("sgd", lr=0.1, momentum=0.9)`` for short. ``name`` is one of
    :data:`OPTIMIZERS`; fields another optimizer uses are ignored.
    """

    __slots__ = ("hp",)

    def __init__(self, hp: OptimConfig | str = "amsgrad", **fields: Any) -> None:
        if isinstance(hp, str):
            hp = OptimConfig(name=hp, **fields)
        elif fields:
            raise TypeError("give an OptimConfig or a name with keyword fields, not both")
        self.hp = hp

    def __repr__(self) -> str:
        return f"Optimizer({self.hp!r})"

    def lr_at(self, step: int, total: int, staleness: int = 0) -> float:
        """The learning rate of update ``step`` of ``total`` (see :func:`scheduled_lr`), of
        a gradient ``staleness`` updates old (see :func:`staleness_scale`; only the APAM
        master passes it)."""
        return scheduled_lr(self.hp.lr, self.hp.schedule, step, total, self.hp.warmup) \
            * staleness_scale(self.hp.staleness_lr, staleness)

    def init(self, params: Tensor) -> OptState:
        """A fresh state for ``params`` (a 1-D tensor), on its device and dtype."""
        hp = self.hp
        state: OptState = {"step": torch.zeros((), dtype=torch.int64)}
        names = {"amsgrad": ("m", "v", "vhat"), "adam": ("m", "v"), "sgd": ("buf",)}[hp.name]
        if hp.name == "sgd" and not hp.momentum:
            names = ()
        for n in names:
            state[n] = torch.zeros_like(params)
        return state

    def update(self, params: Tensor, grad: Tensor, state: OptState,
               lr: float | None = None, tracked: Tensor | None = None) -> None:
        """Apply one step to ``params`` in place; ``lr`` overrides ``hp.lr`` (schedules).

        ``tracked`` (AMSGrad only) is the gossiped second moment ``u`` of
        :func:`damsgrad_step`; it is updated in place too.
        """
        hp = self.hp
        state["step"] += 1
        step = int(state["step"])
        lr = hp.lr if lr is None else lr
        adaptive = dict(step=step, lr=lr, beta1=hp.beta1, beta2=hp.beta2, eps=hp.eps,
                        weight_decay=hp.weight_decay)
        if tracked is not None:
            assert hp.name == "amsgrad", "a tracked second moment needs AMSGrad"
            damsgrad_step(params, grad, state["m"], state["v"], state["vhat"], tracked,
                          bias_correction=hp.bias_correction, **adaptive)
        elif hp.name == "amsgrad":
            amsgrad_step(params, grad, state["m"], state["v"], state["vhat"],
                         bias_correction=hp.bias_correction, **adaptive)
        elif hp.name == "adam":
            adam_step(params, grad, state["m"], state["v"], **adaptive)
        elif hp.name == "sgd":
            sgd_step(params, grad, state.get("buf"), step=step, lr=lr, momentum=hp.momentum,
                     nesterov=hp.nesterov, weight_decay=hp.weight_decay)
        else:  # validated in config; reaching here is a programming error
            raise AssertionError(f"unknown optimizer {hp.name!r}")
