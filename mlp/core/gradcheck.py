"""Gradient checking: analytic gradients against centered finite differences.

A reusable tool (cs231n's `gradient_check.py`, grown up): `numeric_gradient` for any
function of an array, `rel_error`, whole-model checks and per-layer checks
(`check_layer`), with kink detection and a `GradcheckReport` that renders as a table or
a dict. Two whole-model checks, one per way of computing the gradient:

* `check_training_step`: the path training runs, the model's zero-copy backward pass
  plus the L2 gradient the optimizer adds inside its own update pass, against finite
  differences of data loss + reg * sum W^2. This is the check every run records.
* `check_model`: the public API, `data_loss_and_grads`, `reg_loss_and_grads` and
  `loss_and_grads`, each against its own loss.

Those run in float64. `check_step_precision` checks the step in the dtype that trains
(float32 by default): the training step as the trainer runs it, in the model's own dtype,
against the float64 reference step from the same parameters and batch, with a tolerance
derived from that dtype's epsilon and the step's sizes (`step_tolerance`).

The numbers are always float64, whatever dtype the model trains in. A coordinate is a
"kink" when the branches taken by the net's max gates (ReLU sides, Maxout pieces, active
hinge margins) differ between x-h, x and x+h: the centered difference straddles a
point where the function is not differentiable, so its error says nothing about the
backward pass. Kinks are counted, reported and excluded from the verdict.
"""

from __future__ import annotations

import copy
import functools
import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from mlp.core import optim
from mlp.core.layers import BatchNorm, Dropout, Layer, Linear
from mlp.core.model import MLP
from mlp.core.step import step

Array = np.ndarray

# cs231n's bands for the relative error
GOOD = 1e-7
OK = 1e-4
SUSPICIOUS = 1e-2
TINY = 1e-300
# How far above an estimate of rounding (the sqrt(k) eps of a sum, a step's spread over
# summation orders) the float32 step check lets an error go: the estimates' own spread
# and the magnitudes' excess over the result.
MARGIN = 8

# Finite differences lose about eps * |f| / h to rounding: 1e-11 in float64, where a
# gradient entry of 1e-4 then reads 1e-7 off. Extended precision (80-bit on x86-64; plain
# float64 where the platform has none) takes that to 1e-14, so the check measures the
# backward pass and not the rounding of the forward pass.
NUMERIC_DTYPE = np.longdouble
# The step that balances rounding (eps / h) against truncation (h^2) is about eps^(1/3):
# 1e-5 in float64, 1e-6 in 80-bit extended precision.
DEFAULT_H = float(10.0 ** round(np.log10(float(np.finfo(NUMERIC_DTYPE).eps) ** (1 / 3))))


def rel_error(a: Array | float, b: Array | float, floor: float = TINY) -> Array:
    """Elementwise |a - b| / max(|a| + |b|, floor); 0 where both are exactly 0.

    Take `.max()` of the result for the usual single number. The checks below pass as
    `floor` the smallest gradient their finite differences can resolve to 1e-7 (see
    `resolution_floor`): below it a difference measures rounding, not the backward pass.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.abs(a - b) / np.maximum(np.abs(a) + np.abs(b), floor)


def resolution_floor(dtype: np.dtype | type, scale: float, h: float) -> float:
    """The gradient size below which a centered difference cannot be judged to `GOOD`.

    Each evaluation of f rounds off about a few eps * scale (scale: the size of f, or the
    sum of the magnitudes of its terms), so the difference quotient carries
    ~10 eps scale / h of noise, and only gradients of at least that / GOOD can show a
    relative error under GOOD.
    """
    noise = 10 * float(np.finfo(dtype).eps) * max(float(scale), 1.0) / h
    return noise / GOOD


def verdict(max_rel_error: float) -> str:
    """The cs231n band of a relative error: good < 1e-7 <= ok < 1e-4 <= suspicious < 1e-2
    <= wrong (ok is expected near kinks, not for smooth functions)."""
    if not np.isfinite(max_rel_error) or max_rel_error >= SUSPICIOUS:
        return "wrong"
    if max_rel_error >= OK:
        return "suspicious"
    if max_rel_error >= GOOD:
        return "ok"
    return "good"


def numeric_gradient(
    f: Callable[[], float | Array],
    x: Array,
    coords: Sequence[int] | Array | None = None,
    h: float = DEFAULT_H,
    kink_state: Callable[[], list[Array]] | None = None,
) -> tuple[Array, Array]:
    """Centered differences (f(x+h) - f(x-h)) / 2h at flat indices `coords` of x.

    f takes no arguments and reads x, which is perturbed in place and restored; it may
    return a number or a small vector of numbers (then one gradient per entry). With
    `kink_state` (called after each f), also tells which coordinates straddle a kink.
    Returns (gradient (K,) or (K, M) in x's dtype, kink flags (K,) bool), K = len(coords)
    (all coordinates when None).
    """
    if x.dtype not in (np.float64, np.longdouble):
        raise ValueError(f"numeric_gradient needs float64 or longdouble arrays, got {x.dtype}")
    flat = x.reshape(-1)
    if not np.shares_memory(flat, x):
        raise ValueError("numeric_gradient needs a contiguous array it can perturb in place")
    coords = np.arange(flat.size) if coords is None else np.asarray(coords)
    f()
    base = _state(kink_state)
    grad = []
    kinks = np.zeros(len(coords), dtype=bool)
    for k, i in enumerate(coords):
        old = flat[i]
        flat[i] = old + h
        fplus = np.asarray(f(), dtype=x.dtype)
        plus = _state(kink_state)
        flat[i] = old - h
        fminus = np.asarray(f(), dtype=x.dtype)
        minus = _state(kink_state)
        flat[i] = old
        grad.append((fplus - fminus) / (2 * h))
        kinks[k] = not (_same(base, plus) and _same(base, minus))
    return np.array(grad, dtype=x.dtype).reshape((len(coords), *np.shape(f()))), kinks


def _state(kink_state: Callable[[], list[Array]] | None) -> list[Array]:
    return [] if kink_state is None else [s.copy() for s in kink_state()]


def _same(a: list[Array], b: list[Array]) -> bool:
    return all(np.array_equal(u, v) for u, v in zip(a, b, strict=True))


@dataclass
class ParamCheck:
    """One row of a report: the check of one parameter (or input) array."""

    name: str
    part: str
    shape: tuple[int, ...]
    checked: int
    kinks: int
    max_rel_error: float
    mean_rel_error: float

    @property
    def verdict(self) -> str:
        return verdict(self.max_rel_error)


@dataclass
class GradcheckReport:
    """The result of a check: rows (one per parameter and part) and the verdict.

    `passed` is True when every row's max relative error (kinks excluded) is below `tol`.
    """

    rows: list[ParamCheck] = field(default_factory=list)
    tol: float = GOOD
    h: float = DEFAULT_H
    floor: float = TINY

    @property
    def max_rel_error(self) -> float:
        # np.max, not max(): a NaN row must make the whole report NaN (and so "wrong")
        return float(np.max([r.max_rel_error for r in self.rows])) if self.rows else 0.0

    @property
    def kinks(self) -> int:
        return sum(r.kinks for r in self.rows)

    @property
    def passed(self) -> bool:
        """Every row below tol, and in every part (data, reg, total, layer) at least one
        coordinate compared: a part whose coordinates were all kinks proves nothing."""
        compared: dict[str, int] = {}
        for r in self.rows:
            compared[r.part] = compared.get(r.part, 0) + r.checked - r.kinks
        return bool(compared) and min(compared.values()) > 0 and bool(
            self.max_rel_error < self.tol)

    @property
    def verdict(self) -> str:
        return verdict(self.max_rel_error)

    def max_by_param(self, part: str = "total") -> dict[str, float]:
        """{param name: max relative error} for one part ("total", "data" or "reg")."""
        return {r.name: r.max_rel_error for r in self.rows if r.part == part}

    def table(self) -> list[dict]:
        """One dict per row (name, part, shape, checked, kinks, errors, verdict)."""
        return [{**asdict(r), "shape": "x".join(map(str, r.shape)), "verdict": r.verdict}
                for r in self.rows]

    def to_dict(self) -> dict:
        """Everything, JSON-ready."""
        return {"passed": self.passed, "verdict": self.verdict, "tol": self.tol, "h": self.h,
                "floor": self.floor, "max_rel_error": self.max_rel_error, "kinks": self.kinks,
                "rows": self.table()}

    def __str__(self) -> str:
        lines = [f"{'param':<8} {'part':<6} {'shape':<12} {'checked':>7} {'kinks':>5} "
                 f"{'max rel err':>11} {'mean rel err':>12}  verdict"]
        lines += [f"{r.name:<8} {r.part:<6} {'x'.join(map(str, r.shape)):<12} {r.checked:>7} "
                  f"{r.kinks:>5} {r.max_rel_error:>11.2e} {r.mean_rel_error:>12.2e}  {r.verdict}"
                  for r in self.rows]
        lines.append(f"max relative error {self.max_rel_error:.2e} ({self.verdict}), "
                     f"{self.kinks} kinks skipped: {'PASSED' if self.passed else 'FAILED'}")
        return "\n".join(lines)


def _coords(size: int, num_checks: int | None, rng: np.random.Generator) -> Array:
    """All coordinates, or num_checks of them sampled without replacement."""
    if num_checks is None or num_checks >= size:
        return np.arange(size)
    return np.sort(rng.choice(size, size=num_checks, replace=False))


def _row(name: str, part: str, analytic: Array, numeric: Array, kinks: Array,
         coords: Array, shape: tuple[int, ...], floor: float) -> ParamCheck:
    errors = rel_error(analytic.reshape(-1)[coords], numeric, floor)[~kinks]
    return ParamCheck(name=name, part=part, shape=tuple(shape), checked=len(coords),
                      kinks=int(kinks.sum()),
                      max_rel_error=float(errors.max()) if errors.size else 0.0,
                      mean_rel_error=float(errors.mean()) if errors.size else 0.0)


def check_model(
    model: MLP,
    X: Array,
    y: Array,
    num_checks: int | None = None,
    h: float = DEFAULT_H,
    tol: float = GOOD,
    seed: int = 0,
) -> GradcheckReport:
    """Check every parameter's gradient of an MLP on a batch X (N, D), y (N,).

    Rows for three parts: the data loss, the regularization loss and their sum, each
    analytic gradient computed by its own code path in float64 and compared with the
    centered difference of the matching loss (numerics in `NUMERIC_DTYPE`).
    `num_checks` samples that many coordinates per parameter (None: all of them). The
    caller's model is not touched.

    Every loss runs in training mode. Both copies start from the caller's dropout RNG
    state and freeze their Dropout masks, so they drop the same units in every pass;
    BatchNorm uses the batch's statistics (its running statistics, updated by each pass,
    do not enter the training-mode loss).
    """
    analytic_net = _float64_copy(model)
    grads = {"data": analytic_net.data_loss_and_grads(X, y)[1],
             "reg": analytic_net.reg_loss_and_grads()[1],
             "total": analytic_net.loss_and_grads(X, y)[1]}
    return _compare(model, X, y, grads, num_checks, h, tol, seed)


def check_training_step(
    model: MLP,
    optimizer: str | Callable[[dict[str, Array]], optim.Optimizer],
    X: Array,
    y: Array,
    num_checks: int | None = None,
    h: float = DEFAULT_H,
    tol: float = GOOD,
    seed: int = 0,
) -> GradcheckReport:
    """Check the gradient a training step applies, on a batch X (N, D), y (N,).

    The analytic side is the trainer's own path, run on a float64 copy of the model: the
    model's zero-copy backward pass, then `Optimizer.applied_gradients` of an optimizer
    built for that copy (`optimizer`: a name of `optim.OPTIMIZERS`, or a function of the
    parameters that builds one, e.g. the run's `make_optimizer`), which forms
    grads + c * W for `l2_coefficients()` in the same fused pass `step` makes and hands
    that to the update rule. The numeric side differentiates the loss the run minimizes,
    data loss + reg * sum W^2 (numerics in `NUMERIC_DTYPE`). Rows per parameter: "data"
    (the backward pass alone) and "total" (the gradient the update rule receives); one
    row "l2" part "loss" compares the L2 term `step` returns with reg * sum W^2, and one
    row "fused" part "step" the training step as it runs with that reference path
    (`_fused_row`). The caller's model is not touched; dropout and BatchNorm as in
    `check_model`.
    """
    analytic_net = _float64_copy(model)
    make = _maker(optimizer)
    # The layers' own gradient arrays, read by the optimizer's pass before any other pass
    # runs on this net: as in the trainer, no copy.
    _, data_grads = analytic_net.backprop(X, y)
    l2_term, applied = make(analytic_net.params).applied_gradients(
        analytic_net.params, data_grads, l2=analytic_net.l2_coefficients())
    report = _compare(model, X, y, {"data": data_grads, "total": applied}, num_checks, h,
                      tol, seed)
    reg_loss = analytic_net.reg_loss()
    report.rows.append(ParamCheck(name="l2", part="loss", shape=(), checked=1, kinks=0,
                                  max_rel_error=float(rel_error(l2_term, reg_loss)),
                                  mean_rel_error=float(rel_error(l2_term, reg_loss))))
    report.rows.append(_fused_row(model, make, X, y))
    return report


def _fused_row(model: MLP, make: Callable[[dict[str, Array]], optim.Optimizer], X: Array,
               y: Array, steps: int = 2, lr: float = 0.1) -> ParamCheck:
    """The row "step" part "fused": the training step as it runs (`step.step`, the
    weights' gradients accumulated by the GEMMs into the optimizer's state where its rule
    allows) against the reference path checked above (`fused=False`), `steps` steps from
    a fresh optimizer (the first from zero state) on float64 copies: the relative error
    of every parameter's displacement."""

    moved = []
    for fused in (True, False):
        net = _float64_copy(model)
        start = {k: p.copy() for k, p in net.params.items()}
        optimizer = make(net.params)
        for _ in range(steps):
            step(net, optimizer, X, y, lr, fused=fused)
        moved.append(np.concatenate([(net.params[k] - start[k]).ravel() for k in start]))
    # A move below 1e-6 of the largest one is rounding, not an update: the bias before a
    # batch norm has a zero gradient, up to 1e-18 that the two paths round differently.
    err = rel_error(*moved, floor=max(1e-6 * float(np.max(np.abs(moved[1]))), TINY))
    return ParamCheck(name="fused", part="step", shape=(moved[0].size,), checked=err.size,
                      kinks=0, max_rel_error=float(err.max()), mean_rel_error=float(err.mean()))


@dataclass
class PrecisionCheck:
    """The result of `check_step_precision`: per parameter, the relative error of the
    move of the step in `dtype` against the float64 reference step, and the verdict.

    `tol` is the arithmetic's tolerance (`step_tolerance`), the same for every parameter.
    `tols` is each parameter's own: the larger of `tol` and MARGIN times what summing the
    batch in another order changes its move by (`order_spread`: far below `tol` for the
    rules linear in the gradient, above it for RMSProp and Adam where a gradient entry
    cancels over the batch), plus what storing it in `dtype` rounds (`storage_share`: a
    float32 gamma at 1 moves in steps of 6e-8, coarse next to a move of 1e-4 however
    exactly the move was computed). `passed` is True when every parameter's error is
    below its own tolerance. `kinks` counts the units (ReLU sides, Maxout pieces, hinge
    margins) whose branch differed between the two paths' forward passes from the same
    state: an input within rounding of a kink, where the two steps compute different
    functions; a failure with kinks > 0 says nothing of the code. `batches`: how many
    batches `check_step_precision_clear` drew to find one without kinks (1: the first had
    none, or the check ran on one given batch)."""

    dtype: str
    steps: int
    tol: float
    errors: dict[str, float]
    loss_rel_error: float
    kinks: int
    tols: dict[str, float] = field(default_factory=dict)
    batches: int = 1

    def tol_of(self, name: str) -> float:
        """The tolerance of parameter `name` (`tols`; `tol` for one not in it)."""
        return self.tols.get(name, self.tol)

    @property
    def worst(self) -> str:
        """The parameter closest to (or furthest past) its tolerance; "-" when none."""
        return max(self.errors, key=lambda k: self.errors[k] / self.tol_of(k), default="-")

    @property
    def max_rel_error(self) -> float:
        return float(np.max(list(self.errors.values()))) if self.errors else 0.0

    @property
    def passed(self) -> bool:
        return all(e < self.tol_of(k) for k, e in self.errors.items())

    def to_dict(self) -> dict:
        """Everything, JSON-ready."""
        return {"dtype": self.dtype, "steps": self.steps, "tol": self.tol,
                "max_rel_error": self.max_rel_error, "passed": self.passed,
                "worst": self.worst, "loss_rel_error": self.loss_rel_error,
                "kinks": self.kinks, "batches": self.batches, "errors": dict(self.errors),
                "tols": dict(self.tols)}

    def __str__(self) -> str:
        worst = self.worst
        error = self.errors.get(worst, 0.0)
        return (f"{self.dtype} step vs float64 reference, {self.steps} steps: worst "
                f"{worst} {error:.2e} of {self.tol_of(worst):.2e} allowed (arithmetic "
                f"{self.tol:.2e}), max {self.max_rel_error:.2e}, loss "
                f"{self.loss_rel_error:.1e}, {self.kinks} kinks"
                f"{f' on batch {self.batches}' if self.batches > 1 else ''}"
                f": {'PASSED' if self.passed else 'FAILED'}")


def step_tolerance(model: MLP, batch: int, steps: int, dtype: np.dtype | type | None = None
                   ) -> float:
    """The largest relative error of a parameter's move that rounding in `dtype` (the
    model's, by default) explains, after `steps` steps of batch `batch`:
    steps * MARGIN * sqrt(chain) * eps.

    chain is the length of the longest chain of sums in a step: the forward GEMMs' inner
    dimensions (each Linear's fan-in), the loss's sum over the classes, the backward
    GEMMs' (each Linear's fan-out, but the first's: no dx), and the batch, summed by the
    weight gradient's GEMM. A sum of k terms rounded at eps is off by about sqrt(k) eps
    relative to the sum of their magnitudes when the rounding errors are independent
    (Higham & Mary 2019), and errors of a chain add; MARGIN (8) covers the spread of that
    estimate and the magnitudes' excess over the result. Measured in float32 on the benchmark's
    nets (batch 256, 1 step from the same state, momentum): 9e-6 to 2.5e-5, 3 to 6 times
    below this."""
    eps = float(np.finfo(dtype or model.dtype).eps)
    linears = [layer for layer in model.layers if isinstance(layer, Linear)]
    chain = (sum(layer.params["W"].shape[0] for layer in linears)
             + sum(layer.params["W"].shape[1] for layer in linears[1:])
             + model.arch.num_classes + batch)
    return steps * MARGIN * float(np.sqrt(chain)) * eps


def storage_share(start: Array, end: Array, steps: int) -> float:
    """What storing a parameter in its dtype rounds over `steps` steps, as a norm over its
    entries: each step writes the parameter at most twice (Nesterov: p -= mu * v_prev,
    then p += (1 + mu) * v), each write off by at most half the spacing of the dtype's
    numbers at the parameter's value, so steps * ||spacing(max(|start|, |end|))||. It
    is the resolution of the move whatever the arithmetic: a float32 gamma at 1 moved
    by 1e-4 is off by up to 6e-8 per entry, 6e-4 of the move. start, end: the parameter
    before and after, in the dtype that stores it."""
    spacing = np.spacing(np.maximum(np.abs(start), np.abs(end)))
    return steps * float(np.linalg.norm(spacing.astype(np.float64)))


def order_spread(net: MLP, opt: optim.Optimizer, X: Array, y: Array, lr: float,
                 move: dict[str, Array], seed: int = 0) -> dict[str, float]:
    """What summing the batch in another order changes: the step as the trainer runs it
    (`step`, fused, in the net's dtype) of `net` by `opt` (a twin of the checked net and
    its optimizer, which it moves), on the same samples in another order (each keeping
    its dropout mask); per parameter, the norm of the change of its move against `move`
    (the first order's, from the same state). Both orders compute the same step, so the
    change is rounding, as the update rule carries it: about eps for the rules linear in
    the gradient; where RMSProp and Adam divide a gradient entry that cancels over the
    batch by its own size, that entry's rounding becomes its move's."""
    perm = np.random.default_rng(seed).permutation(len(y))
    rows = _PermutedRows(net.dropout_rng, perm)
    for layer in net.layers:
        if isinstance(layer, Dropout):
            layer.rng = rows
    start = {k: p.astype(np.float64) for k, p in net.params.items()}
    step(net, opt, X[perm], y[perm], lr)
    return {k: float(np.linalg.norm(net.params[k].astype(np.float64) - start[k] - move[k]))
            for k in move}


def _twin(net: MLP, opt: optim.Optimizer, make: Callable[[dict[str, Array]], optim.Optimizer],
          dtype: np.dtype | type) -> tuple[MLP, optim.Optimizer]:
    """A copy of `net` in `dtype` (parameters, buffers, dropout RNG) and an optimizer for it
    in `opt`'s state (its buffers and step count)."""
    twin = net.copy(dtype)
    twin_opt = make(twin.params)
    twin_opt.load_state_dict(opt.state_dict())
    return twin, twin_opt


class _PermutedRows:
    """A Dropout layer's generator whose masks follow the samples of a permuted batch: row
    i of a draw is row perm[i] of the generator's own draw."""

    def __init__(self, rng: np.random.Generator, perm: Array) -> None:
        self.rng, self.perm = rng, perm

    def random(self, shape: tuple[int, ...]) -> Array:
        return self.rng.random(shape)[self.perm]


def check_step_precision(
    model: MLP,
    optimizer: str | Callable[[dict[str, Array]], optim.Optimizer],
    X: Array,
    y: Array,
    lr: float = 0.05,
    steps: int = 2,
    tol: float | None = None,
) -> PrecisionCheck:
    """Check the training step in the dtype the model trains in against float64.

    On a copy of the model in its own dtype (float32 by default), `steps` steps of
    `step.step` exactly as the trainer calls it (fused where the optimizer allows, the
    batch cast to that dtype). Before each, a float64 twin takes that copy's parameters,
    buffers, dropout RNG and optimizer state, and makes the same step on the same batch
    (X cast to the model's dtype, then to float64) by the reference path (`fused=False`):
    every step is judged from the state the float32 path reached, so that the optimizer's
    state is checked where it feeds a step and the rounding of one step does not reach the
    next one's forward pass (Adam moves every entry by about lr in the first step, so the
    two paths would otherwise take different ReLU branches in the second). The error of
    each parameter is |move - move64| / max(|move64|, sqrt(size) * rms), 2-norms over the
    parameter, rms the root-mean-square of all the reference moves of that step: a
    parameter whose gradient is a sum that cancels (a gamma, a bias that barely moves) is
    judged against the step's scale, which its rounding is relative to, not against its
    own small move. The biases before a batch norm are left out: their gradient is 0, both
    steps move them by rounding noise (which RMSProp and Adam scale up to lr). `tol`, the
    arithmetic's tolerance of one step, defaults to `step_tolerance`; each parameter's own
    is the larger of `tol` and MARGIN times its `order_spread`, plus its `storage_share`,
    over the same scale. A parameter's error and tolerance are those of the step where it
    came nearest its tolerance. `optimizer`: a name of `optim.OPTIMIZERS` or a function of
    the parameters that builds one. The caller's model is not touched.
    """
    make = _maker(optimizer)
    X = np.asarray(X).astype(model.dtype)
    X64 = X.astype(np.float64)
    tol = step_tolerance(model, len(y), 1) if tol is None else tol
    zero = _zero_gradient(model)
    net = model.copy()  # the path that trains, step after step
    opt = make(net.params)
    # per parameter, (error, tolerance) of the step where it came nearest its tolerance
    worst: dict[str, tuple[float, float]] = {}
    kinks, loss_err = 0, 0.0
    for _ in range(steps):
        ref, ref_opt = _twin(net, opt, make, np.float64)
        twin, twin_opt = _twin(net, opt, make, net.dtype)
        start = {k: p.copy() for k, p in net.params.items()}
        loss, kink_state = _kinked_step(net, opt, X, y, lr, fused=True)
        ref_loss, ref_kink_state = _kinked_step(ref, ref_opt, X64, y, lr, fused=False)
        low = {k: net.params[k].astype(np.float64) - start[k].astype(np.float64) for k in start}
        moved = {k: ref.params[k] - start[k].astype(np.float64) for k in start}
        checked = [k for k in moved if k not in zero]
        rms = float(np.sqrt(np.mean(np.concatenate([moved[k].ravel() for k in checked]) ** 2)))
        scale = {k: max(float(np.linalg.norm(moved[k])), np.sqrt(moved[k].size) * rms, TINY)
                 for k in checked}
        spread = order_spread(twin, twin_opt, X, y, lr, low)
        for k in checked:
            error = float(np.linalg.norm(low[k] - moved[k])) / scale[k]
            own = (max(tol, MARGIN * spread[k] / scale[k])
                   + storage_share(start[k], net.params[k], 1) / scale[k])
            if k not in worst or error / own > worst[k][0] / worst[k][1]:
                worst[k] = (error, own)
        kinks += sum(int(np.sum(a != b)) for a, b in zip(kink_state, ref_kink_state,
                                                          strict=True))
        loss_err = max(loss_err, float(rel_error(loss, ref_loss)))
    return PrecisionCheck(dtype=model.dtype.name, steps=steps,
                          errors={k: e for k, (e, _) in worst.items()}, loss_rel_error=loss_err,
                          kinks=kinks, tol=tol, tols={k: t for k, (_, t) in worst.items()})


def check_step_precision_clear(
    model: MLP,
    optimizer: str | Callable[[dict[str, Array]], optim.Optimizer],
    batches: Iterable[tuple[Array, Array]],
    lr: float = 0.05,
    steps: int = 2,
) -> PrecisionCheck:
    """`check_step_precision` on the first of `batches` whose steps took the same branch
    at every kink in both dtypes (kinks == 0), else on the last: an input within rounding
    of a ReLU's corner makes the two steps compute different functions, which says
    nothing of the code; another batch does not. On best_mlp's net (2 x 2 x 1024 x 256
    units a step) about one batch in 10 has a kink, and the check then fails by 10 to 30
    times its tolerance. `batches` is consumed lazily; the result's `batches` says how many
    were drawn."""
    check = None
    for drawn, (X, y) in enumerate(batches, start=1):
        check = check_step_precision(model, optimizer, X, y, lr=lr, steps=steps)
        check.batches = drawn
        if check.kinks == 0:
            break
    if check is None:
        raise ValueError("check_step_precision_clear: no batch")
    return check


def _maker(optimizer: str | Callable[[dict[str, Array]], optim.Optimizer]
           ) -> Callable[[dict[str, Array]], optim.Optimizer]:
    """A function of the parameters that builds the optimizer: `optimizer` itself, or
    `optim.make_optimizer` of a name with its defaults."""
    if isinstance(optimizer, str):
        return functools.partial(optim.make_optimizer, optimizer)
    return optimizer


def _zero_gradient(model: MLP) -> set[str]:
    """The parameters whose gradient is 0 by construction: the biases of the Linear layers
    before a BatchNorm, which subtracts any per-feature shift."""
    names = {id(p): k for k, p in model.params.items()}
    return {names[id(layer.params["b"])] for layer, after in itertools.pairwise(model.layers)
            if isinstance(layer, Linear) and isinstance(after, BatchNorm)}


def _kinked_step(net: MLP, opt: optim.Optimizer, X: Array, y: Array, lr: float,
                 fused: bool) -> tuple[float, list[Array]]:
    """One `step` of net by opt: its loss and the branch taken at every kink of its
    forward pass (the layers', then the loss's)."""
    loss_fn, states = net.loss_fn, []

    def recording(scores: Array, y: Array) -> tuple:
        states.extend([] if net.loss_kink_fn is None else [net.loss_kink_fn(scores, y)])
        return loss_fn(scores, y)

    net.loss_fn = recording
    try:
        loss = step(net, opt, X, y, lr, fused=fused)[0]
    finally:
        net.loss_fn = loss_fn
    return loss, [*(s.copy() for s in net.kink_state()), *states]


def _float64_copy(model: MLP) -> MLP:
    """The model in float64 with frozen Dropout masks: the analytic side of a check."""
    net = model.copy("float64")
    net.freeze_dropout()
    return net


def _compare(model: MLP, X: Array, y: Array, grads: dict[str, dict[str, Array]],
             num_checks: int | None, h: float, tol: float, seed: int) -> GradcheckReport:
    """Rows comparing analytic gradients by part ("data", "reg" or "total": the gradient
    of the data loss, of reg * sum W^2, of their sum) with centered differences of those
    losses on an extended-precision copy of the model, at the same coordinates."""
    net = model.copy(NUMERIC_DTYPE)
    net.freeze_dropout()
    X = np.asarray(X, dtype=NUMERIC_DTYPE)

    def losses() -> Array:
        return np.array([net.data_loss(X, y), net.reg_loss()], dtype=NUMERIC_DTYPE)

    floor = resolution_floor(NUMERIC_DTYPE, np.abs(losses()).sum(), h)
    rng = np.random.default_rng(seed)
    report = GradcheckReport(tol=tol, h=h, floor=floor)
    for name, p in net.params.items():
        coords = _coords(p.size, num_checks, rng)
        numeric, kinks = numeric_gradient(losses, p, coords, h, net.kink_state)
        by_part = {"data": (numeric[:, 0], kinks),
                   "reg": (numeric[:, 1], np.zeros_like(kinks)),  # smooth: no kinks
                   "total": (numeric.sum(axis=1), kinks)}
        report.rows += [_row(name, part, grads[part][name], *by_part[part], coords, p.shape,
                             floor) for part in grads]
    return report


def check_layer(
    layer: Layer,
    x: Array,
    dout: Array | None = None,
    num_checks: int | None = None,
    h: float = DEFAULT_H,
    tol: float = GOOD,
    seed: int = 0,
) -> GradcheckReport:
    """Check one layer's backward: the gradients of sum(forward(x) * dout) with respect to
    x (N, D) and to each parameter, against `backward(dout)`.

    The layer's backward runs in float64 (its parameters must be float64); the numeric
    side runs on a copy in `NUMERIC_DTYPE`. A random dout (standard normal, of the
    output's shape) is drawn from `seed` when not given.
    """
    rng = np.random.default_rng(seed)
    for name, p in layer.params.items():
        if p.dtype != np.float64:
            raise ValueError(f"check_layer needs float64 parameters; {name} is {p.dtype}")
    x = np.array(x, dtype=np.float64)
    out = layer.forward(x)
    if dout is None:
        dout = rng.standard_normal(out.shape)
    analytic = {"x": layer.backward(dout).copy(),
                **{name: g.copy() for name, g in layer.grads.items()}}

    twin = copy.deepcopy(layer)
    twin.params = {name: p.astype(NUMERIC_DTYPE) for name, p in layer.params.items()}
    arrays = {"x": x.astype(NUMERIC_DTYPE), **twin.params}
    dout_n = np.asarray(dout, dtype=NUMERIC_DTYPE)

    def f() -> Array:
        return np.sum(twin.forward(arrays["x"]) * dout_n)

    def kink_state() -> list[Array]:
        state = twin.kink_state()
        return [] if state is None else [state]

    floor = resolution_floor(NUMERIC_DTYPE, np.abs(out * dout).sum(), h)
    report = GradcheckReport(tol=tol, h=h, floor=floor)
    for name, arr in arrays.items():
        coords = _coords(arr.size, num_checks, rng)
        numeric, kinks = numeric_gradient(f, arr, coords, h, kink_state)
        report.rows.append(_row(name, "layer", analytic[name], numeric, kinks, coords,
                                arr.shape, floor))
    return report
