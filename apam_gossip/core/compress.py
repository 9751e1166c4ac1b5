"""Compressed pairwise averaging: what a gossip exchange sends when ``compress`` is not
``none``, and the rule that keeps it exact in the mean. No processes here.

**The scheme** (CHOCO-SGD's idea, Koloskova et al. 2019, on the edges of asynchronous
pairwise gossip). For each edge ``(i, j)`` both ends keep the same two *public copies*:
``p_ij`` (worker ``i``'s model as ``j`` knows it) and ``p_ji``. An exchange of ``i`` with
``j``:

1. each side compresses the change of its model from its public copy,
   ``q_i = Q(x_i - p_ij)`` and ``q_j = Q(x_j - p_ji)``, and sends it (``q`` is the
   packet on the wire: :meth:`Compressor.nbytes` bytes, not ``4 n``);
2. both sides add the *decoded* packets to the copies, ``p_ij += D(q_i)``,
   ``p_ji += D(q_j)``: every side decodes the same bytes, so the two ends' copies stay
   bit-identical without ever being sent whole;
3. ``d = gamma / 2 * (p_ji - p_ij)``; ``x_i += d`` and ``x_j -= d``.

What is conserved: ``x_i + x_j`` (so ``sum_i x_i``, up to float rounding, as with exact
averaging). IEEE rounding is symmetric under negation, so ``a - b == -(b - a)`` and
``(-d) * c == -(d * c)`` hold exactly: the two sides move by exactly opposite amounts. The audit
(``sum_i x_i(end) = sum_i x_i(0) + local steps``) therefore keeps its meaning for
compressed runs. What is not: the pair does not land on its mean; it moves toward it by
``gamma / 2`` of the difference of what each knows of the other.

Why nothing is lost (error feedback): the part of ``x_i - p_ij`` that ``Q`` dropped stays
in that difference and is sent at the next exchange over the edge, so the copies track
the models; as they converge, ``x_i - x_j -> p_ij - p_ji``, which the mixing step
shrinks by ``(1 - gamma)`` each time. With ``Q`` exact and ``gamma = 1`` an exchange is the
exact pairwise average (up to rounding). Proof sketch, for a contraction ``Q``
(``|Q(v) - v|^2 <= (1 - delta) |v|^2``: top-k has ``delta >= k / n``, blockwise int8
``delta ~ 1``): CHOCO-Gossip's Lyapunov argument, ``Phi = sum |x_i - xbar|^2 + c sum
|x_i - p_i|^2``, decreases linearly in expectation for ``gamma`` of order ``delta``
(Koloskova et al. 2019, Theorem 2), edge by edge here because each edge's copies are
updated only by that edge's exchanges. :func:`default_gamma` takes ``1`` for int8 and
``min(1, 3 F)`` for top-k: on a 16-ring the best of those tried was about 4-6 F, on a
4x4 torus about 2-3 F, and ``gamma = 1`` diverges at F = 0.1 (``tests/test_compress.py``
checks the default on both graphs).
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor


class Compressor:
    """``encode`` a vector into a ``uint8`` packet of :meth:`nbytes` bytes, and
    ``decode_add`` a packet into a vector (``into += D(packet)``). Deterministic: the
    same packet decodes to the same floats anywhere, which keeps two ends' copies
    equal. ``name``: the spec it was parsed from (``int8``, ``topk:0.01``)."""

    name = "none"

    def nbytes(self, n: int) -> int:
        return 4 * n

    def encode(self, v: Tensor, out: Tensor) -> None:
        out.view(torch.float32).copy_(v)

    def decode_add(self, packet: Tensor, into: Tensor) -> None:
        into.add_(packet.view(torch.float32))


# models of this many entries or more take the compiled int8 loops (the size where
# numba's one-off compile, about 1 s per process, starts to pay; as apam_gossip.average)
FUSED_MIN_NUMEL = 1 << 20


@functools.cache
def _int8_kernels():
    """numba loops for :class:`Int8` on CPU float32 (None without numba): the encode in
    one pass per block that stays in cache (torch takes six over the whole model), and
    the decode added in place. The decode does what torch's does, one float32 product
    and one float32 sum per entry (no fastmath: no fused multiply-add), so a packet
    decodes to the same floats on a GPU rank and a CPU rank."""
    try:
        import numba
        import numpy as np
    except ImportError:  # pragma: no cover - numba is a dependency
        return None

    @numba.njit(nogil=True, boundscheck=False, cache=False)
    def encode(x, pub, block, scales, q):  # pragma: no cover - compiled
        n = x.shape[0]
        for b in range(scales.shape[0]):
            s, e = b * block, min(b * block + block, n)
            m = np.float32(0.0)
            for k in range(s, e):
                d = abs(x[k] - pub[k])
                if d > m or d != d:  # a NaN poisons its block's scale, as in torch
                    m = d
            scale = m / np.float32(127.0)
            scales[b] = scale
            if not scale > 0:
                for k in range(s, e):
                    q[k] = 0
                continue
            for k in range(s, e):
                v = np.rint((x[k] - pub[k]) / scale)
                q[k] = np.int8(max(-127.0, min(127.0, v)))

    @numba.njit(nogil=True, boundscheck=False, cache=False)
    def decode_add(q, scales, block, into):  # pragma: no cover - compiled
        n = into.shape[0]
        for b in range(scales.shape[0]):
            scale = scales[b]
            for k in range(b * block, min(b * block + block, n)):
                into[k] += np.float32(q[k]) * scale

    x = np.zeros(3, np.float32)
    q = np.zeros(3, np.int8)
    sc = np.zeros(2, np.float32)
    encode(x, x, 2, sc, q)  # compile now, not inside a first exchange under two locks
    decode_add(q, sc, 2, x)
    return encode, decode_add


def _fused_ok(*ts: Tensor) -> bool:
    return (ts[0].numel() >= FUSED_MIN_NUMEL
            and all(t.device.type == "cpu" and t.is_contiguous() for t in ts)
            and _int8_kernels() is not None)


class Int8(Compressor):
    """Blockwise int8: each block of :attr:`block` entries is sent as one float32 scale
    (its largest magnitude / 127) and one int8 per entry, rounded to nearest: about
    ``n + n / 256`` bytes for ``4 n`` (3.98x fewer), an error of at most half a step
    (``scale / 2``) per entry."""

    block = 1024
    name = "int8"

    def _blocks(self, n: int) -> int:
        return -(-n // self.block)

    def nbytes(self, n: int) -> int:
        return 4 * self._blocks(n) + n

    def encode(self, v: Tensor, out: Tensor) -> None:
        n, nb = v.numel(), self._blocks(v.numel())
        padded = torch.zeros(nb * self.block, dtype=torch.float32, device=v.device)
        padded[:n] = v
        rows = padded.view(nb, self.block)
        scale = rows.abs().amax(dim=1) / 127.0
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round(rows / safe[:, None]).clamp_(-127, 127).to(torch.int8)
        out[:4 * nb].view(torch.float32).copy_(scale)
        out[4 * nb:].view(torch.int8).copy_(q.view(-1)[:n])

    def encode_change(self, x: Tensor, public: Tensor, out: Tensor) -> bool:
        """``out <- Q(x - public)`` in one compiled pass where it applies (CPU float32,
        :data:`FUSED_MIN_NUMEL` entries or more); False where it does not."""
        if not (x.dtype == torch.float32 and _fused_ok(x, public, out)):
            return False
        nb = self._blocks(x.numel())
        encode, _ = _int8_kernels()
        encode(x.numpy(), public.numpy(), self.block, out[:4 * nb].view(torch.float32).numpy(),
               out[4 * nb:].view(torch.int8).numpy())
        return True

    def decode_add(self, packet: Tensor, into: Tensor) -> None:
        n, nb = into.numel(), self._blocks(into.numel())
        scale = packet[:4 * nb].view(torch.float32)
        q = packet[4 * nb:4 * nb + n].view(torch.int8)
        if into.dtype == torch.float32 and _fused_ok(into, packet):
            _, decode = _int8_kernels()
            decode(q.numpy(), scale.numpy(), self.block, into.numpy())
            return
        full, rest = divmod(n, self.block)
        if full:
            into[:full * self.block].view(full, self.block).add_(
                q[:full * self.block].view(full, self.block).to(torch.float32)
                * scale[:full, None])
        if rest:
            into[full * self.block:].add_(q[full * self.block:].to(torch.float32)
                                          * scale[full])


class TopK(Compressor):
    """The ``k = ceil(F n)`` entries of largest magnitude, sent as int32 indices and
    float32 values (8 bytes each: ``1 / (2 F)`` times fewer bytes than the model); the
    rest waits in the public copy's difference for later exchanges."""

    def __init__(self, fraction: float) -> None:
        if not 0 < fraction <= 1:
            raise ValueError(f"topk fraction must be in (0, 1], got {fraction}")
        self.fraction = fraction
        self.name = f"topk:{fraction:g}"

    def k(self, n: int) -> int:
        return max(1, min(n, math.ceil(self.fraction * n)))

    def nbytes(self, n: int) -> int:
        return 8 * self.k(n)

    def encode(self, v: Tensor, out: Tensor) -> None:
        k = self.k(v.numel())
        idx = self._largest(v.abs(), k)
        out[:4 * k].view(torch.int32).copy_(idx)
        out[4 * k:].view(torch.float32).copy_(v[idx])

    @staticmethod
    def _largest(a: Tensor, k: int) -> Tensor:
        """The indices of the ``k`` largest of ``a`` (exactly, in no order). A big vector
        is first cut to the entries above a threshold from a strided sample (the
        (1 - 2k/n) quantile), and the top k taken among those: exact whenever at least k
        pass it (every one of the top k is then above it), else the whole vector's. NaN
        sorts as the largest magnitude, so a diverged model's NaN is sent on."""
        n = a.numel()
        if n >= FUSED_MIN_NUMEL and 2 * k < n and not bool(torch.isnan(a).any()):
            sample = a[::max(1, n // 65536)]
            rank = max(1, int(sample.numel() * (1 - 2 * k / n)))
            thr = sample.kthvalue(rank).values
            cand = (a >= thr).nonzero().squeeze(1)
            if cand.numel() >= k:
                return cand[torch.topk(a[cand], k, sorted=False).indices]
        return torch.topk(a, k, sorted=False).indices

    def decode_add(self, packet: Tensor, into: Tensor) -> None:
        k = self.k(into.numel())
        idx = packet[:4 * k].view(torch.int32).long()
        into.index_add_(0, idx, packet[4 * k:8 * k].view(torch.float32))


def warm_up(comp: Compressor | None, n: int) -> None:
    """Compile what ``comp`` will run on a model of ``n`` entries now (about 1 s, once per
    process), not inside a first exchange that holds two workers' locks."""
    if isinstance(comp, Int8) and n >= FUSED_MIN_NUMEL:
        _int8_kernels()


def parse_compress(spec: str) -> Compressor | None:
    """``none`` (None: the exact average, no copies), ``int8`` or ``topk:F`` with ``F``
    in (0, 1]; a ValueError naming the spec otherwise."""
    s = str(spec).strip().lower()
    if s == "none":
        return None
    if s == "int8":
        return Int8()
    if s.startswith("topk:"):
        try:
            f = float(s[5:])
        except ValueError:
            f = float("nan")
        if not 0 < f <= 1:  # (NaN fails too)
            raise ValueError(f"compress {spec!r}: topk:F needs a fraction F in (0, 1], "
                             "e.g. topk:0.01")
        return TopK(f)
    raise ValueError(f"compress must be none, int8 or topk:F (F in (0, 1]), got {spec!r}")


def default_gamma(comp: Compressor) -> float:
    """The mixing step ``gamma`` when none is given (see the module docstring)."""
    if isinstance(comp, TopK):
        return min(1.0, 3.0 * comp.fraction)
    return 1.0


def gamma_for(comp: Compressor | None, given: float | None) -> float:
    """The mixing step of a run: ``given``, else :func:`default_gamma` (1 uncompressed)."""
    if given is not None:
        return float(given)
    return default_gamma(comp) if comp is not None else 1.0


def wire_bytes(cfg, numel: int, n_params: int) -> int:
    """The bytes one average of a gossip run puts on the wire, both ways: two packets, or
    two models (and their tracked second moments) uncompressed. ``cfg``: a RunConfig."""
    comp = parse_compress(cfg.compress)
    if comp is not None:
        return 2 * comp.nbytes(numel)
    return 2 * 4 * (numel + (n_params if cfg.adaptive_state == "tracked" else 0))


def packet(comp: Compressor, n: int, device: torch.device | str = "cpu") -> Tensor:
    """A packet buffer for a model of ``n`` entries."""
    return torch.zeros(comp.nbytes(n), dtype=torch.uint8, device=device)


def encode_change(comp: Compressor, x: Tensor, public: Tensor, out: Tensor,
                  scratch: Tensor | None = None) -> None:
    """Step 1: ``out <- Q(x - public)`` (``scratch``: a buffer for the difference)."""
    if isinstance(comp, Int8) and comp.encode_change(x, public, out):
        return
    diff = torch.sub(x, public, out=scratch) if scratch is not None else x - public
    comp.encode(diff, out)


def mix(comp: Compressor, x: Tensor, mine: Tensor, theirs: Tensor, sent: Tensor,
        got: Tensor, gamma: float, scratch: Tensor | None = None) -> None:
    """Steps 2 and 3 on one side: ``mine += D(sent)``, ``theirs += D(got)``, then
    ``x += gamma / 2 * (theirs - mine)`` (the other side, with the roles swapped, moves by
    exactly the opposite amount)."""
    comp.decode_add(sent, mine)
    comp.decode_add(got, theirs)
    d = torch.sub(theirs, mine, out=scratch) if scratch is not None else theirs - mine
    x.add_(d.mul_(gamma / 2))  # the product first, as the other side's: exactly -d there


def exchange_pair(comp: Compressor, gamma: float, x_i: Tensor, x_j: Tensor, p_ij: Tensor,
                  p_ji: Tensor, buf_i: Tensor | None = None, buf_j: Tensor | None = None
                  ) -> None:
    """One whole exchange where one process holds both sides (shared memory, the
    simulator): ``p_ij``/``p_ji`` are the edge's one pair of copies, each on its model's
    device (two GPUs: the step crosses once)."""
    n = x_i.numel()
    q_i = buf_i if buf_i is not None else packet(comp, n, x_i.device)
    q_j = buf_j if buf_j is not None else packet(comp, n, x_j.device)
    encode_change(comp, x_i, p_ij, q_i)  # each side's copies where its model is
    encode_change(comp, x_j, p_ji, q_j)
    comp.decode_add(q_i, p_ij)
    comp.decode_add(q_j, p_ji)
    d = (p_ji.to(x_i.device) - p_ij).mul_(gamma / 2)
    x_i.add_(d)
    x_j.sub_(d.to(x_j.device))


__all__ = ["Compressor", "Int8", "TopK", "parse_compress", "warm_up", "default_gamma",
           "gamma_for",
           "wire_bytes", "packet",
           "encode_change", "mix", "exchange_pair"]
