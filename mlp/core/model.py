"""The multi-layer perceptron: a stack of layers, a loss and L2 regularization.

    X (N, D) -> {Linear -> [norm] -> activation -> [Dropout]} x len(hidden_sizes)
             -> Linear -> scores (N, C)

as cs231n's FullyConnectedNet: the norm is `BatchNorm` (norm="batch") or `LayerNorm`
(norm="layer") of the affine output, `Dropout` follows each hidden activation when
dropout > 0. With activation="maxout" the Linear -> activation pair is one `Maxout`
layer, or, with a norm, Linear (H*k pieces) -> norm over the H*k pieces -> `PieceMax`.

Parameters are named like cs231n's: W1, b1 (and gamma1, beta1 with a norm) for the
first layer, ..., WL, bL for the scores layer, and `model.params` maps those names to the
very arrays the layers compute with, so an optimizer that updates `params` in place
trains the net; they are views of one flat buffer, `model.flat_params` (the weights,
then the biases, then the rest), so that the update can make one pass over all of them.
`model.params` holds trainable parameters only; `model.buffers` maps
names to the arrays that are state but not trained (BatchNorm's running_mean1,
running_var1, ...). `save`/`load`, `set_params` and `copy` carry both.

Training and evaluation mode are chosen by the method called, never by a flag to
remember: the losses and gradients (`loss_and_grads`, `data_loss_and_grads`, `loss`,
`data_loss`) run in training mode (Dropout drops units, BatchNorm normalizes with the
batch's statistics and updates its running ones), `scores(X)` and `predict(X)` in
evaluation mode (Dropout is the identity, BatchNorm uses its running statistics);
`scores(X, training=True)` gives the training-mode scores. Each pass sets `training` on
every layer. Without Dropout and BatchNorm both modes compute the same function. For a
gradient check, `freeze_dropout()` makes each Dropout layer reuse one mask, so every
training-mode pass computes the same function (BatchNorm then depends on the batch only).

The loss is data loss + reg * sum of squared weights (biases, gamma and beta not
regularized). With label_smoothing > 0 (softmax only) the training data loss is the
cross-entropy against smoothed targets; `eval_loss_fn` stays the plain loss (see `MLP`).

Every public method returns arrays the caller owns (scores, gradients): keep them, and
later passes leave them alone. The layers reuse their work arrays between passes so that
training allocates nothing; only the trainer's step reads the layers' gradient arrays
directly (`backprop`), and it is done with them before the next pass.
"""

from __future__ import annotations

import functools
import itertools
import json
import zipfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from mlp.core import losses
from mlp.core.layers import (
    ACTIVATIONS,
    Activation,
    BatchNorm,
    Dropout,
    Layer,
    LayerNorm,
    Linear,
    Maxout,
    PieceMax,
    activation_gate,
)

Array = np.ndarray

INITS = ("he", "xavier", "normal")
NORMS = {"batch": BatchNorm, "layer": LayerNorm}  # and None (or "none"): no norm layer
# longdouble (80-bit extended on x86-64) is for the gradient check's finite differences.
DTYPES = ("float32", "float64", np.dtype(np.longdouble).name)


@dataclass(frozen=True)
class Architecture:
    """Everything that fixes the shapes and the function of an MLP (not its values)."""

    input_dim: int = 3072
    hidden_sizes: tuple[int, ...] = (100,)
    num_classes: int = 10
    activation: str = "relu"
    loss: str = "softmax"
    reg: float = 0.0
    dtype: str = "float32"
    leaky_slope: float = 0.01
    elu_alpha: float = 1.0
    maxout_pieces: int = 2
    dropout: float = 0.0
    norm: str | None = None
    label_smoothing: float = 0.0

    def validate(self) -> None:
        """Raise ValueError naming the argument, its value and what is allowed."""
        _require(_is_int(self.input_dim) and self.input_dim > 0,
                 "input_dim", self.input_dim, "a positive integer")
        _require(_is_int(self.num_classes) and self.num_classes >= 2,
                 "num_classes", self.num_classes, "an integer >= 2")
        for h in self.hidden_sizes:
            _require(_is_int(h) and h > 0, "hidden_sizes", list(self.hidden_sizes),
                     "a list of positive integers ([] for a linear classifier)")
        _require(self.activation in ACTIVATIONS, "activation", self.activation,
                 f"one of {list(ACTIVATIONS)}")
        _require(self.loss in losses.LOSSES, "loss", self.loss, f"one of {list(losses.LOSSES)}")
        _require(_is_number(self.reg) and self.reg >= 0, "reg", self.reg, "a number >= 0")
        _require(self.dtype in DTYPES, "dtype", self.dtype, f"one of {list(DTYPES)}")
        _require(_is_number(self.leaky_slope) and 0 <= self.leaky_slope < 1,
                 "leaky_slope", self.leaky_slope, "a number in [0, 1)")
        _require(_is_number(self.elu_alpha) and self.elu_alpha > 0,
                 "elu_alpha", self.elu_alpha, "a number > 0")
        _require(_is_int(self.maxout_pieces) and self.maxout_pieces >= 2,
                 "maxout_pieces", self.maxout_pieces, "an integer >= 2")
        _require(_is_number(self.dropout) and 0 <= self.dropout < 1, "dropout", self.dropout,
                 "a drop probability in [0, 1) (0: no dropout)")
        _require(self.norm is None or (isinstance(self.norm, str) and self.norm in NORMS),
                 "norm", self.norm, f"one of {[None, 'none', *NORMS]}")
        _require(_is_number(self.label_smoothing) and 0 <= self.label_smoothing < 1,
                 "label_smoothing", self.label_smoothing, "a number in [0, 1) (0: one-hot targets)")
        _require(self.label_smoothing == 0 or self.loss == "softmax", "label_smoothing",
                 self.label_smoothing, f"0 with loss={self.loss!r}: smoothing softens the "
                 "one-hot targets of the softmax loss")


def _is_int(v: object) -> bool:
    return isinstance(v, int | np.integer) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, int | float | np.number) and not isinstance(v, bool) and np.isfinite(v)


def _require(ok: bool, name: str, value: object, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} is not allowed: expected {allowed}")


def _architecture(hidden_sizes: Sequence[int], dtype: str | np.dtype, norm: str | None,
                  **rest: object) -> Architecture:
    """The validated Architecture of MLP's arguments: hidden_sizes as a tuple, the dtype
    by its name, norm "none" as None."""
    if isinstance(hidden_sizes, int | str) or not isinstance(hidden_sizes, Sequence):
        raise ValueError(f"hidden_sizes={hidden_sizes!r} is not allowed: expected a list of "
                         "positive integers ([] for a linear classifier)")
    try:
        dtype_name = np.dtype(dtype).name
    except TypeError:
        dtype_name = str(dtype)  # validate() names it and lists what is allowed
    arch = Architecture(hidden_sizes=tuple(hidden_sizes), dtype=dtype_name,
                        norm=None if norm == "none" else norm, **rest)
    arch.validate()
    return arch


class MLP:
    """A fully connected net with hand-written backprop.

    Build with `MLP(input_dim, hidden_sizes, num_classes, activation=..., loss=...,
    reg=..., init=..., weight_scale=..., dtype=..., seed=..., dropout=..., norm=...)`;
    `init` is "he" (std sqrt(2/fan_in)), "xavier" (Glorot, std sqrt(2/(fan_in+fan_out)))
    or "normal" (std = weight_scale, as in cs231n). Initial values are drawn in float64
    from `seed` and then cast, so float32 and float64 nets of one seed start from the
    same weights. `dropout` is the drop probability after each hidden activation (0: no
    Dropout layers), `norm` None/"none", "batch" or "layer" (stored as None, "batch" or
    "layer"). The Dropout masks come from `dropout_rng`, seeded with [seed, 4], so runs
    of one seed drop the same units.

    `label_smoothing` s (softmax loss only) trains against the targets
    (1 - s) onehot + s / C: `loss_fn` is that smoothed loss, the one every loss and
    gradient method computes (and the gradient check differentiates). `eval_loss_fn` is
    the plain loss of `loss`, cross-entropy against the true labels, which the trainer
    reports for the train, validation and test sets, so that runs with and without
    smoothing (or another s) compare on one scale; the smoothed loss of a perfect
    classifier is not 0 and grows with s.
    """

    def __init__(
        self,
        input_dim: int = 3072,
        hidden_sizes: Sequence[int] = (100,),
        num_classes: int = 10,
        activation: str = "relu",
        loss: str = "softmax",
        reg: float = 0.0,
        init: str = "he",
        weight_scale: float = 1e-3,
        dtype: str | np.dtype = "float32",
        seed: int | None = 0,
        leaky_slope: float = 0.01,
        elu_alpha: float = 1.0,
        maxout_pieces: int = 2,
        dropout: float = 0.0,
        norm: str | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        self.arch = _architecture(
            input_dim=input_dim, hidden_sizes=hidden_sizes, num_classes=num_classes,
            activation=activation, loss=loss, reg=reg, dtype=dtype, leaky_slope=leaky_slope,
            elu_alpha=elu_alpha, maxout_pieces=maxout_pieces, dropout=dropout, norm=norm,
            label_smoothing=label_smoothing)
        _require(init in INITS, "init", init, f"one of {list(INITS)}")
        _require(_is_number(weight_scale) and weight_scale > 0, "weight_scale", weight_scale,
                 "a number > 0")
        self.dtype = np.dtype(self.arch.dtype)
        self.eval_loss_fn = losses.LOSSES[loss]
        # A Python float keeps float32 arithmetic in float32 (a NumPy float64 would not).
        self.loss_fn = functools.partial(self.eval_loss_fn, label_smoothing=float(
            label_smoothing)) if label_smoothing else self.eval_loss_fn
        self.loss_kink_fn = losses.KINK_STATES[loss]
        self.layers: list[Layer] = []
        self.params: dict[str, Array] = {}
        self.buffers: dict[str, Array] = {}
        self._param_layers: dict[str, tuple[Layer, str]] = {}
        self.dropout_rng = np.random.default_rng(None if seed is None else [seed, 4])
        self._build(np.random.default_rng(seed), init, weight_scale)
        self._last_scores: Array | None = None
        self._last_y: Array | None = None

    def _build(self, rng: np.random.Generator, init: str, weight_scale: float) -> None:
        """The layer stack of the module docstring, its weights drawn from rng."""
        arch = self.arch
        dims = [arch.input_dim, *arch.hidden_sizes]
        maxout = arch.activation == "maxout"
        k = arch.maxout_pieces if maxout else 1
        for i, (fan_in, width) in enumerate(itertools.pairwise(dims), start=1):
            W, b = self._init(rng, init, weight_scale, fan_in, width * k)
            if maxout and arch.norm is None:
                self._add(str(i), Maxout(W, b, k))
            else:
                self._add(str(i), Linear(W, b))
                if arch.norm is not None:
                    self._add(str(i), NORMS[arch.norm](width * k, dtype=self.dtype))
                self.layers.append(PieceMax(k) if maxout else Activation(activation_gate(
                    arch.activation, arch.leaky_slope, arch.elu_alpha)))
            if arch.dropout:
                self.layers.append(Dropout(arch.dropout, self.dropout_rng))
        W, b = self._init(rng, init, weight_scale, dims[-1], arch.num_classes)
        self._add(str(len(dims)), Linear(W, b))
        self.layers[0].input_grad = False  # the gradient of the data is never needed
        for layer in self.layers[:-1]:  # the scores are returned: the caller may keep them
            layer.reuse_buffers = True
        self._pack()
        self._weight_names = [name for name, (layer, key) in self._param_layers.items()
                              if key in layer.weight_keys]
        self._linear_names = [name for name, (layer, key) in self._param_layers.items()
                              if isinstance(layer, Linear)]

    def _pack(self) -> None:
        """Make every parameter a view of one flat buffer, `flat_params`: the weights first,
        then the other parameters of the Linear layers (biases), then the rest, each group
        in layer order. An optimizer then keeps its state in the same layout and updates
        the weights, or all the Linear parameters, with one call (`optim.Momentum`)."""
        def rank(name: str) -> int:
            layer, key = self._param_layers[name]
            return 0 if key in layer.weight_keys else 1 if isinstance(layer, Linear) else 2

        order = sorted(self.params, key=rank)  # stable: layer order within a group
        self.flat_params = np.empty(sum(self.params[n].size for n in order), self.dtype)
        offset = 0
        for name in order:
            p = self.params[name]
            view = self.flat_params[offset:offset + p.size].reshape(p.shape)
            view[...] = p
            layer, key = self._param_layers[name]
            layer.params[key] = self.params[name] = view
            offset += p.size

    def _init(self, rng: np.random.Generator, init: str, weight_scale: float,
              fan_in: int, fan_out: int) -> tuple[Array, Array]:
        std = {"he": np.sqrt(2.0 / fan_in), "xavier": np.sqrt(2.0 / (fan_in + fan_out)),
               "normal": weight_scale}[init]
        W = (std * rng.standard_normal((fan_in, fan_out))).astype(self.dtype)
        return W, np.zeros(fan_out, dtype=self.dtype)

    def _add(self, suffix: str, layer: Layer) -> None:
        self.layers.append(layer)
        for key, value in layer.params.items():
            self.params[key + suffix] = value
            self._param_layers[key + suffix] = (layer, key)
        for key, value in layer.buffers.items():
            self.buffers[key + suffix] = value

    # -- forward / backward --------------------------------------------------------------

    @property
    def reg(self) -> float:
        return self.arch.reg

    def weight_names(self) -> list[str]:
        """Names of the regularized parameters (all weights, no biases)."""
        return list(self._weight_names)

    def linear_names(self) -> list[str]:
        """Names of the parameters of the Linear layers (weights and biases): those whose
        gradient the layer's backward can accumulate into an optimizer's array (`into`)."""
        return list(self._linear_names)

    def scores(self, X: Array, training: bool = False) -> Array:
        """Class scores (N, C) for inputs X (N, D), cast to the model's dtype; in
        evaluation mode unless `training` (see the module docstring)."""
        out = self._check_X(X)
        for layer in self.layers:
            layer.training = training
            out = layer.forward(out)
        return out

    def predict(self, X: Array, batch_size: int = 1000) -> Array:
        """Predicted class ids (N,) for X (N, D), in chunks of batch_size rows (evaluation
        mode)."""
        self._check_X(X)
        return np.concatenate([self.scores(X[i:i + batch_size]).argmax(axis=1)
                               for i in range(0, max(len(X), 1), batch_size)])[:len(X)]

    def data_loss(self, X: Array, y: Array) -> float:
        """The data loss alone, forward only in training mode (what the gradient check
        perturbs)."""
        scores = self.scores(X, training=True)
        y = self._check_y(y, len(scores))
        self._last_scores, self._last_y = scores, y
        return self.loss_fn(scores, y)[0]

    def reg_loss(self) -> float:
        """reg * sum of squared weights."""
        if self.reg == 0:
            return 0.0
        return self.reg * sum(np.vdot(self.params[n], self.params[n])
                              for n in self.weight_names())

    def l2_coefficients(self) -> dict[str, float]:
        """c for each regularized parameter, so that the gradient of the L2 term is c * W
        (c = 2 reg): what `Optimizer.step(..., l2=...)` adds in its own pass."""
        return {name: 2 * self.reg for name in self.weight_names()} if self.reg else {}

    def loss(self, X: Array, y: Array) -> float:
        """Data loss + regularization loss, forward only in training mode."""
        return self.data_loss(X, y) + self.reg_loss()

    def data_loss_and_grads(self, X: Array, y: Array) -> tuple[float, dict[str, Array]]:
        """Data loss and its gradients (new arrays keyed like `params`) for a batch X (N, D),
        y (N,): forward in training mode, loss, then backward through the layers."""
        loss, grads = self.backprop(X, y)
        return loss, {name: g.copy() for name, g in grads.items()}

    def backprop(self, X: Array, y: Array,
                 into: dict[str, tuple[Array, float, float]] | None = None
                 ) -> tuple[float, dict[str, Array]]:
        """`data_loss_and_grads` without the copies, for the trainer's step (and the checks
        and benchmark of that step): the gradient arrays are the layers' own, overwritten
        by the next pass. Nothing outside the training step may keep them.

        `into` maps some names of `linear_names()` to (C, alpha, beta): the gradient of
        those parameters is accumulated into C where it is computed (by the GEMM, for a
        weight: `Linear.backward`), and their entries of the returned grads are stale
        (the optimizer's `sinks`)."""
        scores = self.scores(X, training=True)
        y = self._check_y(y, len(scores))
        loss, dout = self.loss_fn(scores, y)
        sinks: dict[Layer, dict[str, tuple[Array, float, float]]] = {}
        for name, sink in (into or {}).items():
            layer, key = self._param_layers[name]
            sinks.setdefault(layer, {})[key] = sink
        for layer in reversed(self.layers):
            sink = sinks.get(layer)
            dout = layer.backward(dout) if sink is None else layer.backward(dout, sink)
        return loss, {name: layer.grads[key] for name, (layer, key) in self._param_layers.items()}

    def reg_loss_and_grads(self) -> tuple[float, dict[str, Array]]:
        """reg * sum W^2 and its gradients 2 reg W (zero for biases), as new arrays."""
        grads = {name: np.zeros_like(p) for name, p in self.params.items()}
        for name in self.weight_names():
            grads[name] = 2 * self.reg * self.params[name]
        return self.reg_loss(), grads

    def loss_and_grads(self, X: Array, y: Array) -> tuple[float, dict[str, Array]]:
        """Total loss (data + L2) and its gradients, new arrays keyed like `params`, for a
        batch X (N, D), y (N,), in training mode.

        The trainer computes the same thing in two parts, without copies: the data part
        (`backprop`) and the L2 part, `l2_coefficients()`, inside the optimizer's pass;
        `gradcheck.check_training_step` checks that path.
        """
        loss, grads = self.data_loss_and_grads(X, y)
        for name, c in self.l2_coefficients().items():
            grads[name] += c * self.params[name]
        return loss + self.reg_loss(), grads

    def freeze_dropout(self, frozen: bool = True) -> None:
        """Make every Dropout layer draw one mask at the next training-mode pass and reuse
        it (the batch size must then stay the same), so the loss is one fixed function of
        the parameters, as a gradient check needs; `freeze_dropout(False)` undoes it."""
        for layer in self.layers:
            if isinstance(layer, Dropout):
                layer.freeze(frozen)

    def kink_state(self) -> list[Array]:
        """The branch taken by every max in the last forward pass (layers, then the loss)."""
        states = [s for layer in self.layers if (s := layer.kink_state()) is not None]
        if self.loss_kink_fn is not None and self._last_scores is not None:
            states.append(self.loss_kink_fn(self._last_scores, self._last_y))
        return states

    # -- input checks ---------------------------------------------------------------------

    def _check_X(self, X: Array) -> Array:
        X = np.asarray(X)
        if X.ndim != 2 or X.shape[1] != self.arch.input_dim:
            raise ValueError(f"X has shape {X.shape}: expected (N, {self.arch.input_dim})")
        return X.astype(self.dtype, copy=False)

    def _check_y(self, y: Array, n: int) -> Array:
        y = np.asarray(y)
        if y.shape != (n,) or y.dtype.kind not in "iu":
            raise ValueError(f"y has shape {y.shape} and dtype {y.dtype}: expected ({n},) "
                             "integer class ids")
        # One pass at every step: as unsigned, a negative label is above every class id.
        if n and y.view(f"u{y.itemsize}").max() >= self.arch.num_classes:
            raise ValueError(f"y has labels in [{y.min()}, {y.max()}]: expected labels in "
                             f"[0, {self.arch.num_classes - 1}]")
        return y

    # -- parameters and files -----------------------------------------------------------

    def set_params(self, params: dict[str, Array],
                   buffers: dict[str, Array] | None = None) -> None:
        """Copy values into the model's parameters and, when given, its buffers (names and
        shapes must match exactly; values are cast to the model's dtype)."""
        _assign(self.params, params, "parameter")
        if buffers is not None:
            _assign(self.buffers, buffers, "buffer")

    def copy(self, dtype: str | np.dtype | None = None) -> MLP:
        """A deep copy, optionally in another dtype (e.g. float64 for a gradient check):
        parameters, buffers and the state of `dropout_rng` (so the copy draws the masks
        this model would draw next)."""
        arch = self.arch if dtype is None else replace(self.arch, dtype=np.dtype(dtype).name)
        clone = MLP.from_architecture(arch)
        clone.set_params(self.params, self.buffers)
        clone.dropout_rng.bit_generator.state = self.dropout_rng.bit_generator.state
        return clone

    @classmethod
    def from_architecture(cls, arch: Architecture, **kwargs: object) -> MLP:
        """A freshly initialized MLP of that architecture (kwargs: init, seed, ...)."""
        return cls(**asdict(arch), **kwargs)

    def save(self, path: str | Path) -> Path:
        """Write params, buffers and architecture to an .npz file (no pickles) and return
        its path."""
        path = Path(path)
        arch = asdict(self.arch)
        arch["hidden_sizes"] = list(arch["hidden_sizes"])
        with open(path, "wb") as f:
            # .item(): NumPy scalars the constructor accepted become plain JSON numbers
            np.savez(f, __architecture__=np.array(json.dumps(arch, default=lambda v: v.item())),
                     **self.params, **self.buffers)
        return path

    @classmethod
    def load(cls, path: str | Path) -> MLP:
        """Build the MLP stored by `save`. A missing, corrupt or inconsistent file raises
        ValueError saying what is wrong."""
        path = Path(path)
        try:
            data = np.load(path, allow_pickle=False)
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise ValueError("it holds a single array, not an .npz archive of parameters")
            with data:
                arrays = {k: data[k] for k in data.files}
        except FileNotFoundError:
            raise
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
            raise ValueError(f"{path} is not a readable mlp-lab model file (.npz): {e}") from e
        if "__architecture__" not in arrays:
            raise ValueError(f"{path} has no '__architecture__' entry: not an mlp-lab model file")
        try:
            arch = json.loads(str(arrays.pop("__architecture__")))
            arch["hidden_sizes"] = tuple(arch["hidden_sizes"])
            model = cls(**arch, seed=0)
        except (TypeError, KeyError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} has an unreadable architecture entry: {e}") from e
        buffers = {k: v for k, v in arrays.items() if k in model.buffers}
        try:
            model.set_params({k: v for k, v in arrays.items() if k not in buffers}, buffers)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e
        return model


def _assign(target: dict[str, Array], values: dict[str, Array], kind: str) -> None:
    """Copy values into target's arrays in place; names and shapes must match exactly."""
    missing = sorted(set(target) - set(values))
    unexpected = sorted(set(values) - set(target))
    if missing or unexpected:
        raise ValueError(f"{kind}s do not match the architecture: missing {missing}, "
                         f"unexpected {unexpected}")
    for name, value in values.items():
        if value.shape != target[name].shape:
            raise ValueError(f"{kind} {name} has shape {value.shape}: expected "
                             f"{target[name].shape}")
        target[name][...] = value
