"""Update rules (SGD, momentum, Nesterov, RMSProp, Adam) and learning-rate schedules.

An optimizer is built for a dict of parameters (name -> array, float32 or float64) and
then `step(params, grads, lr)` updates those arrays in place, so the model that holds
them trains. Its state (velocities, moment estimates, the step counter `t`) lives in
arrays of the parameters' dtype, allocated once, and `state_dict()` returns it flat
("v/W1", "m/b2", "t") so that it fits an `.npz` without pickling. The update is the hot
loop of training and memory-bound: each rule's `_update` works on chunks that fit the
cache (`mlp.elementwise`), with a small scratch array, and the L2 gradient of
`step(..., l2=...)` is added in that same pass. `applied_gradients` runs the pass without
updating, to show the gradient check what the rules receive.

The fused step: SGD and momentum are linear in the gradient, so the GEMM that computes a
weight's gradient x^T dout can add it straight into the array the rule updates
(`sinks`: momentum's velocity v = mu * v - lr * x^T dout, plain SGD's weights), and
`step(..., fused=...)` then finishes those weights (momentum: v -= lr * c * p for the L2
term, then p += v; SGD: nothing). The gradient array is never written nor read; a bias's
gradient, summed over the batch, goes into its velocity the same way. The finish is
whole-array BLAS calls and a dot product, which NumPy's BLAS spreads over its threads
(`blas.axpy`): on the 1024-1024 net 2.1 ms per step against 3.1 ms for the same
arithmetic on cached chunks in one thread, and 2.5 ms for one single-threaded copy of the
weights and velocities. When the parameters are views of one flat buffer
(`MLP.flat_params`), the state buffers take the same layout, and the finish makes one
call per span of neighbours instead of one per parameter: for an MLP, a dot product and
an axpy over all the weights (the L2 term), then one axpy over all the Linear layers'
parameters (p += v), whatever the depth. Nesterov needs the old velocity beside the new one,
RMSProp and Adam the gradient's square: they take the gradient arrays (`sinks` returns
nothing).

A `Schedule` maps the global step (0 for the first update) to the learning rate.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

import numpy as np

from mlp.core import blas, elementwise

Array = np.ndarray
Sink = tuple[Array, float, float]  # (C, alpha, beta): C = alpha * x^T dout + beta * C

OPTIMIZERS = ("sgd", "momentum", "nesterov", "rmsprop", "adam")
SCHEDULES = ("constant", "step", "exponential", "cosine", "onecycle")


def _require(ok: bool, key: str, value: object, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{key}={value!r} is not allowed: expected {allowed}")


def _require_fraction(key: str, value: float) -> None:
    _require(0 <= value < 1, f"optim.{key}", value, "a number in [0, 1)")


def _require_eps(eps: float) -> None:
    _require(0 < eps < math.inf, "optim.eps", eps, "a finite number > 0")


class Optimizer:
    """Base class: per-parameter state buffers named by `buffers`, and `t`.

    Subclasses set `name` and `buffers` and implement `_update(p, g, *state, lr, scratch)`,
    which changes p (and the state) in place: it is called on matching 1-d chunks of the
    parameter, its gradient and its state buffers, with a scratch array of the same size.
    """

    name: str = ""
    buffers: tuple[str, ...] = ()
    nonnegative: tuple[str, ...] = ()  # buffers that hold means of squares

    def __init__(self, params: dict[str, Array]) -> None:
        self.t = 0
        self.state: dict[str, Array] = {}
        self._slots: dict[str, tuple[Array, ...]] = {}
        # Parameters that are views of one flat buffer (`MLP.flat_params`) get state buffers
        # of the same layout: neighbours in the parameters are neighbours in the state, and
        # a pass over neighbours is one call (`_spans`).
        self._flat = _flat_base(params)
        flats = [np.zeros_like(self._flat) for _ in self.buffers] if self._flat is not None \
            else None
        for key, p in params.items():
            if flats is None:
                arrays = [np.zeros_like(p) for _ in self.buffers]
            else:
                lo = _offset(p, self._flat)
                arrays = [flat[lo:lo + p.size].reshape(p.shape) for flat in flats]
            state = {f"{buf}/{key}": a for buf, a in zip(self.buffers, arrays, strict=True)}
            self.state.update(state)
            self._slots[key] = tuple(state.values())
        self._flat_state = flats
        self._built = dict(params)  # the very arrays: `_spans` merges only these
        self._span_cache: dict[tuple[str, ...], list[tuple[Array, tuple[Array, ...]]]] = {}

    def step(self, params: dict[str, Array], grads: dict[str, Array], lr: float,
             l2: Mapping[str, float] | None = None, fused: Collection[str] = ()) -> float:
        """One update of every parameter in place: params[k] (any shape) from grads[k] (same).

        `params` must have the keys the optimizer was built for; `lr` is the learning rate
        of this step (a schedule's value). `l2` maps some keys to c: for those, the gradient
        is grads[k] + c * params[k] (the gradient of an L2 term c/2 * |p|^2; the model's
        `l2_coefficients()`), formed chunk by chunk in the pass that updates p, so that each
        weight is read from memory once per step (grads[k] itself is not changed).

        Returns the L2 term, the sum of c/2 * |p|^2 at the parameters before this update,
        summed in the same pass (0.0 without `l2`).

        `fused`: the names whose data gradient went into `sinks(...)` arrays in this step
        (grads[k] is not read for them); their update is finished here.
        """
        self._check_keys(params)
        self.t += 1
        # A Python float keeps float32 arithmetic in float32 (a NumPy float64 would not).
        lr, l2 = float(lr), l2 or {}
        rest = {key: p for key, p in params.items() if key not in fused}
        l2_term = self._pass(rest, grads, l2, functools.partial(self._update, lr=lr))
        if fused:
            l2_term += self._finish(params, fused, lr, l2)
        return l2_term

    def _finish(self, params: dict[str, Array], fused: Collection[str], lr: float,
                l2: Mapping[str, float]) -> float:
        """Finish the fused update of the parameters `fused` (see `sinks`); returns
        the sum of c/2 |p|^2 over them, before the update."""
        raise NotImplementedError(f"{self.name} has no fused update")

    def _spans(self, params: dict[str, Array], keys: Collection[str]
               ) -> list[tuple[Array, tuple[Array, ...]]]:
        """The parameters `keys` as (p, state arrays) of as few 1-d spans as their layout
        allows: neighbours in `MLP.flat_params` (and so in the state) are merged, any
        other parameter is a span of its own."""
        keys = tuple(keys)
        if self._flat is None or any(params[k] is not self._built[k] for k in keys):
            return [(params[k].reshape(-1), tuple(a.reshape(-1) for a in self._slots[k]))
                    for k in keys]
        if keys not in self._span_cache:
            self._span_cache[keys] = self._merged(params, keys)
        return self._span_cache[keys]

    def _merged(self, params: dict[str, Array], keys: tuple[str, ...]
                ) -> list[tuple[Array, tuple[Array, ...]]]:
        ranges = sorted((_offset(params[k], self._flat), params[k].size) for k in keys)
        merged: list[list[int]] = []
        for lo, size in ranges:
            if merged and merged[-1][1] == lo:
                merged[-1][1] = lo + size
            else:
                merged.append([lo, lo + size])
        return [(self._flat[lo:hi], tuple(f[lo:hi] for f in self._flat_state))
                for lo, hi in merged]

    def sinks(self, params: dict[str, Array], weights: Collection[str], lr: float,
              l2: Mapping[str, float] | None = None) -> dict[str, Sink]:
        """Where this step's update takes the data gradient of each weight in `weights`
        straight from the GEMM that computes it: {name: (C, alpha, beta)}, to be computed
        as C = alpha * x^T dout + beta * C (`Linear.backward(dout, into=...)`), then
        finished by `step(..., fused=<these names>)` with the same lr and l2. Empty for the
        rules that need the gradient itself (the default)."""
        return {}

    def applied_gradients(self, params: dict[str, Array], grads: dict[str, Array],
                          l2: Mapping[str, float] | None = None
                          ) -> tuple[float, dict[str, Array]]:
        """The L2 term `step` would return and the gradient its update rule would receive
        for every parameter (new arrays of the parameters' shapes), from the very pass
        `step` makes, with the rule replaced by a copy: nothing is updated, neither the
        parameters nor the state nor `t`. What the gradient check of the training step
        compares with finite differences.
        """
        self._check_keys(params)
        applied = {key: np.empty_like(p) for key, p in params.items()}

        def record(p: Array, g: Array, *state_and_out: Array, scratch: Array) -> None:
            np.copyto(state_and_out[-1], g)

        l2_term = self._pass(params, grads, l2, record, extra=applied)
        return l2_term, applied

    def _check_keys(self, params: dict[str, Array]) -> None:
        if params.keys() != self._slots.keys():
            raise ValueError(f"optimizer was built for parameters {sorted(self._slots)}, "
                             f"got {sorted(params)}")

    def _pass(self, params: dict[str, Array], grads: dict[str, Array],
              l2: Mapping[str, float] | None, rule: Callable[..., None],
              extra: dict[str, Array] | None = None) -> float:
        """rule(p, g, *state, [extra[k]], scratch=...) on the chunks of every parameter
        of `params`, g with the L2 gradient added for the keys of l2; returns the L2 term."""
        l2 = l2 or {}
        l2_term = 0.0
        for key, p in params.items():
            arrays = (p, grads[key], *self._slots[key], *([extra[key]] if extra else []))
            if l2.get(key):
                squares: list[Array] = []
                kernel = functools.partial(self._with_l2, l2[key], squares, rule)
                elementwise.chunked(kernel, *arrays, rows=2)
                l2_term += l2[key] / 2 * float(np.sum(squares))
            else:
                elementwise.chunked(rule, *arrays)
        return l2_term

    @staticmethod
    def _with_l2(c: float, squares: list[Array], rule: Callable[..., None], p: Array, g: Array,
                 *rest: Array, scratch: Array) -> None:
        """rule with the gradient g + c p, on a chunk; appends the chunk's |p|^2."""
        squares.append(np.vdot(p, p))
        total_grad, scratch = scratch
        np.multiply(p, c, out=total_grad)
        total_grad += g
        rule(p, total_grad, *rest, scratch=scratch)

    def _update(self, p: Array, g: Array, *state: Array, lr: float, scratch: Array) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Array]:
        """A copy of the state: "<buffer>/<param>" -> array (param's shape), "t" -> 0-d int64."""
        state = {key: arr.copy() for key, arr in self.state.items()}
        state["t"] = np.array(self.t, dtype=np.int64)
        return state

    def check_state_dict(self, state: Mapping[str, Array]) -> None:
        """Raise ValueError unless `load_state_dict` can take `state`: the keys of
        `state_dict()`, each buffer of its parameter's shape, finite, and >= 0 for the
        buffers of `nonnegative` (running means of squares); "t" a 0-d integer >= 0."""
        expected = {*self.state, "t"}
        missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
        if missing or unexpected:
            raise ValueError(f"{self.name} state does not match: missing {missing}, "
                             f"unexpected {unexpected}")
        for key, arr in self.state.items():
            value = np.asarray(state[key])
            if value.shape != arr.shape:
                raise ValueError(f"{self.name} state {key!r} has shape {value.shape}, "
                                 f"expected {arr.shape}")
            if not np.all(np.isfinite(value)) or (
                    key.split("/")[0] in self.nonnegative and np.any(value < 0)):
                raise ValueError(f"{self.name} state {key!r} holds values it cannot take "
                                 f"(NaN, infinite{', negative' * bool(self.nonnegative)})")
        t = np.asarray(state["t"])
        if t.shape != () or t.dtype.kind not in "iu" or t < 0:
            raise ValueError(f"{self.name} state 't' must be an integer >= 0, got {t!r}")

    def load_state_dict(self, state: Mapping[str, Array]) -> None:
        """Restore what `state_dict` returned (copied into the live buffers); raises
        ValueError, changing nothing, when `check_state_dict` refuses it."""
        self.check_state_dict(state)
        for key, arr in self.state.items():
            np.copyto(arr, state[key])
        self.t = int(state["t"])


class SGD(Optimizer):
    """Vanilla gradient descent: p -= lr * g.

    Fused: the GEMM writes p = (1 - lr * c) * p - lr * x^T dout, the whole update; the L2
    term is summed from p before it (in `sinks`, a read-only pass)."""

    name = "sgd"

    def __init__(self, params: dict[str, Array]) -> None:
        super().__init__(params)
        self._l2_before: dict[str, float] = {}

    def sinks(self, params: dict[str, Array], weights: Collection[str], lr: float,
              l2: Mapping[str, float] | None = None) -> dict[str, Sink]:
        l2 = l2 or {}
        self._l2_before = {k: l2[k] / 2 * float(np.vdot(params[k], params[k]))
                           for k in weights if l2.get(k)}
        return {k: (params[k], -float(lr), 1.0 - float(lr) * l2.get(k, 0.0)) for k in weights}

    def _finish(self, params: dict[str, Array], fused: Collection[str], lr: float,
                l2: Mapping[str, float]) -> float:
        return sum(self._l2_before.pop(key, 0.0) for key in fused)  # the GEMM did the update

    def _update(self, p: Array, g: Array, *state: Array, lr: float, scratch: Array) -> None:
        np.multiply(g, lr, out=scratch)
        p -= scratch


class Momentum(Optimizer):
    """SGD with momentum: v = mu * v - lr * g; p += v. State: "v/<param>"."""

    name = "momentum"
    buffers = ("v",)

    def __init__(self, params: dict[str, Array], momentum: float = 0.9) -> None:
        _require_fraction("momentum", momentum)
        super().__init__(params)
        self.momentum = momentum

    def sinks(self, params: dict[str, Array], weights: Collection[str], lr: float,
              l2: Mapping[str, float] | None = None) -> dict[str, Sink]:
        v = self._slots
        return {k: (v[k][0], -float(lr), self.momentum) for k in weights}

    def _update(self, p: Array, g: Array, *state: Array, lr: float, scratch: Array) -> None:
        (v,) = state
        self._advance(v, g, lr, scratch)
        p += v

    def _finish(self, params: dict[str, Array], fused: Collection[str], lr: float,
                l2: Mapping[str, float]) -> float:
        # v holds mu * v - lr * x^T dout, from the GEMM. Whole-array BLAS calls, not
        # cached chunks: BLAS spreads them over its threads (`blas.axpy`); one call per
        # span of neighbouring parameters (`_spans`): for an MLP's flat buffer, the L2
        # term's two passes over all the weights at once, then p += v over all of them.
        l2_term = 0.0
        for c in sorted({l2.get(k, 0.0) for k in fused} - {0.0}):
            for p, (v,) in self._spans(params, [k for k in fused if l2.get(k, 0.0) == c]):
                l2_term += c / 2 * float(np.vdot(p, p))
                blas.axpy(-lr * c, p, v)
        for p, (v,) in self._spans(params, fused):
            blas.axpy(1.0, v, p)
        return l2_term

    def _advance(self, v: Array, g: Array, lr: float, scratch: Array) -> None:
        v *= self.momentum
        np.multiply(g, lr, out=scratch)
        v -= scratch


class Nesterov(Momentum):
    """Nesterov momentum in the cs231n notes' form, which needs no lookahead gradient.

    v_prev = v; v = mu * v - lr * g; p += -mu * v_prev + (1 + mu) * v. State: "v/<param>".
    """

    name = "nesterov"

    def sinks(self, params: dict[str, Array], weights: Collection[str], lr: float,
              l2: Mapping[str, float] | None = None) -> dict[str, Sink]:
        return {}  # the update needs v before and after: see the module docstring

    def _update(self, p: Array, g: Array, *state: Array, lr: float, scratch: Array) -> None:
        (v,) = state
        mu = self.momentum
        # The -mu * v_prev term goes in first, while v still holds v_prev.
        np.multiply(v, mu, out=scratch)
        p -= scratch
        self._advance(v, g, lr, scratch)
        np.multiply(v, 1 + mu, out=scratch)
        p += scratch


class RMSProp(Optimizer):
    """RMSProp: cache = d * cache + (1 - d) * g^2; p -= lr * g / (sqrt(cache) + eps).

    State: "cache/<param>", the running mean of squared gradients.
    """

    name = "rmsprop"
    buffers = ("cache",)
    nonnegative = ("cache",)

    def __init__(self, params: dict[str, Array], decay_rate: float = 0.99,
                 eps: float = 1e-8) -> None:
        _require_fraction("decay_rate", decay_rate)
        _require_eps(eps)
        super().__init__(params)
        self.decay_rate = decay_rate
        self.eps = eps

    def _update(self, p: Array, g: Array, *state: Array, lr: float, scratch: Array) -> None:
        (cache,) = state
        cache *= self.decay_rate
        np.square(g, out=scratch)
        scratch *= 1 - self.decay_rate
        cache += scratch
        np.sqrt(cache, out=scratch)
        scratch += self.eps
        np.divide(g, scratch, out=scratch)
        scratch *= lr
        p -= scratch


class Adam(Optimizer):
    """Adam with bias correction (cs231n's form), t counting the steps taken.

    m = b1 * m + (1 - b1) * g; v = b2 * v + (1 - b2) * g^2;
    p -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps). State: "m/<param>",
    "v/<param>" and "t".
    """

    name = "adam"
    buffers = ("m", "v")
    nonnegative = ("v",)

    def __init__(self, params: dict[str, Array], beta1: float = 0.9, beta2: float = 0.999,
                 eps: float = 1e-8) -> None:
        _require_fraction("beta1", beta1)
        _require_fraction("beta2", beta2)
        _require_eps(eps)
        super().__init__(params)
        self.beta1 = beta1
        self.beta2 = beta2
        self.eps = eps

    def _update(self, p: Array, g: Array, *state: Array, lr: float, scratch: Array) -> None:
        m, v = state
        m *= self.beta1
        np.multiply(g, 1 - self.beta1, out=scratch)
        m += scratch
        v *= self.beta2
        np.square(g, out=scratch)
        scratch *= 1 - self.beta2
        v += scratch
        np.divide(v, 1 - self.beta2**self.t, out=scratch)
        np.sqrt(scratch, out=scratch)
        scratch += self.eps
        np.divide(m, scratch, out=scratch)
        # The first moment's bias correction folds into the step size.
        scratch *= lr / (1 - self.beta1**self.t)
        p -= scratch


def _flat_base(params: dict[str, Array]) -> Array | None:
    """The 1-d buffer every parameter is a contiguous view of (`MLP.flat_params`), or None."""
    bases = {id(p.base): p.base for p in params.values()}
    if len(bases) != 1:
        return None
    (base,) = bases.values()
    if base is None or base.ndim != 1 or not base.flags.c_contiguous or not all(
            p.flags.c_contiguous for p in params.values()):
        return None
    return base


def _offset(p: Array, base: Array) -> int:
    """Where the view p starts in base, in elements."""
    return (p.__array_interface__["data"][0] - base.__array_interface__["data"][0]) \
        // base.itemsize


def make_optimizer(name: str, params: dict[str, Array], momentum: float = 0.9,
                   decay_rate: float = 0.99, beta1: float = 0.9, beta2: float = 0.999,
                   eps: float = 1e-8) -> Optimizer:
    """The optimizer `name` (one of OPTIMIZERS) with state allocated for `params`.

    Every hyperparameter is checked, also those the chosen rule does not use, so that a
    config with an impossible value fails whatever optim.name it is run with; a
    ValueError names the key as optim.<key>.
    """
    _require(name in OPTIMIZERS, "optim.name", name, f"one of {list(OPTIMIZERS)}")
    for key, value in (("momentum", momentum), ("decay_rate", decay_rate), ("beta1", beta1),
                       ("beta2", beta2)):
        _require_fraction(key, value)
    _require_eps(eps)
    if name == "sgd":
        return SGD(params)
    if name == "momentum":
        return Momentum(params, momentum)
    if name == "nesterov":
        return Nesterov(params, momentum)
    if name == "rmsprop":
        return RMSProp(params, decay_rate, eps)
    return Adam(params, beta1, beta2, eps)


@dataclass(frozen=True)
class Schedule:
    """Learning rate at a global step: base lr, optional linear warmup, then a decay.

    The warmup covers the first `warmup_steps` = round(warmup_epochs * steps_per_epoch)
    steps, rising linearly as lr * (step + 1) / warmup_steps, so its last step uses lr.
    The decay's clock starts where the warmup ends (at lr, without a jump): "constant"
    keeps lr; "step" multiplies by gamma every step_size epochs; "exponential" is
    lr * decay**epoch, per epoch as in cs231n; "cosine" anneals per step from lr to min_lr,
    which it reaches at step epochs * steps_per_epoch (after the last update) and keeps.

    "onecycle" (Smith & Topin 2018) is "cosine" whose warmup (warmup_epochs > 0, the
    rising part of the cycle, e.g. 0.3 * epochs) starts from lr / div_factor and rises
    along a half cosine, not a line, to lr at step warmup_steps: from there it anneals to
    min_lr as "cosine" does.
    """

    name: str
    lr: float
    steps_per_epoch: int
    epochs: int
    warmup_epochs: float = 0.0
    step_size: int = 10
    gamma: float = 0.1
    decay: float = 0.95
    min_lr: float = 0.0
    div_factor: float = 25.0

    def __post_init__(self) -> None:
        _require(self.name in SCHEDULES, "optim.schedule.name", self.name,
                 f"one of {list(SCHEDULES)}")
        _require(0 < self.lr < math.inf, "optim.lr", self.lr, "a finite number > 0")
        _require(_is_int(self.steps_per_epoch) and self.steps_per_epoch >= 1,
                 "optim.schedule.steps_per_epoch", self.steps_per_epoch, "an integer >= 1")
        _require(_is_int(self.epochs) and self.epochs >= 1, "optim.schedule.epochs", self.epochs,
                 "an integer >= 1")
        # The decay needs at least one step after the warmup (cosine divides by their number).
        _require(0 <= self.warmup_epochs < self.epochs and self.warmup_steps < self.total_steps,
                 "optim.schedule.warmup_epochs", self.warmup_epochs,
                 f"a number >= 0 that leaves steps after the warmup (< epochs={self.epochs})")
        _require(_is_int(self.step_size) and self.step_size >= 1, "optim.schedule.step_size",
                 self.step_size, "an integer >= 1")
        _require(0 < self.gamma <= 1, "optim.schedule.gamma", self.gamma, "a number in (0, 1]")
        _require(0 < self.decay <= 1, "optim.schedule.decay", self.decay, "a number in (0, 1]")
        _require(0 <= self.min_lr < self.lr, "optim.schedule.min_lr", self.min_lr,
                 f"a number >= 0 and < optim.lr={self.lr}")
        _require(1 <= self.div_factor < math.inf, "optim.schedule.div_factor", self.div_factor,
                 "a finite number >= 1 (the cycle starts at optim.lr / div_factor)")
        _require(self.name != "onecycle" or self.warmup_epochs > 0,
                 "optim.schedule.warmup_epochs", self.warmup_epochs,
                 "a number > 0 with optim.schedule.name=onecycle: the epochs of the rise to "
                 "optim.lr (e.g. 0.3 * epochs)")

    @property
    def warmup_steps(self) -> int:
        """Number of warmup steps (0: no warmup)."""
        return round(self.warmup_epochs * self.steps_per_epoch)

    @property
    def total_steps(self) -> int:
        """Number of updates in the run: epochs * steps_per_epoch."""
        return self.epochs * self.steps_per_epoch

    def __call__(self, step: int) -> float:
        """The learning rate for global step `step` (>= 0; 0 is the first update)."""
        if step < 0:
            raise ValueError(f"step={step!r} is not allowed: expected an integer >= 0")
        warmup = self.warmup_steps
        if step < warmup and self.name == "onecycle":
            return _cosine(self.lr / self.div_factor, self.lr, step / warmup)
        if step < warmup:
            return self.lr * (step + 1) / warmup
        step -= warmup
        epoch = step // self.steps_per_epoch
        if self.name == "step":
            return self.lr * self.gamma ** (epoch // self.step_size)
        if self.name == "exponential":
            return self.lr * self.decay**epoch
        if self.name in ("cosine", "onecycle"):
            return _cosine(self.lr, self.min_lr, min(step / (self.total_steps - warmup), 1.0))
        return self.lr


def _cosine(start: float, end: float, progress: float) -> float:
    """Half a cosine from start (progress 0) to end (progress 1)."""
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * progress))


def _is_int(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)
