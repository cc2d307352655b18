"""Layers: `Linear`, the activations of the lecture, and `Maxout`.

Every layer has `forward(x)`, which caches what `backward(dout)` needs, and
`backward(dout)`, which returns dx and stores the parameter gradients in `grads` (keyed
like `params`). Both are vectorized over the batch. Activations apply the elementwise
gates of `gates.py` to whole arrays: the derivative rules are written once, there.

`kink_state()` returns the branch each unit took in the last forward pass (which side of
a ReLU's 0, which Maxout piece), or None for smooth layers: the gradient check compares
it between x+h and x-h to spot coordinates that straddle a kink.
"""

from __future__ import annotations

import numpy as np

from mlp import gates

Array = np.ndarray


class Layer:
    """Base class: no parameters, identity kink state."""

    params: dict[str, Array]
    grads: dict[str, Array]
    weight_keys: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.params = {}
        self.grads = {}

    def forward(self, x: Array) -> Array:
        raise NotImplementedError

    def backward(self, dout: Array) -> Array:
        raise NotImplementedError

    def kink_state(self) -> Array | None:
        return None


class Linear(Layer):
    """Affine layer out = x @ W + b, W (D, H), b (H,).

    forward: x (N, D) -> out (N, H). backward: dout (N, H) -> dx (N, D), with
    grads["W"] = x^T dout (D, H) and grads["b"] = sum of dout over the batch (H,).
    """

    weight_keys = ("W",)

    def __init__(self, W: Array, b: Array) -> None:
        super().__init__()
        self.params = {"W": W, "b": b}
        self.grads = {"W": np.zeros_like(W), "b": np.zeros_like(b)}
        self.x: Array | None = None

    def forward(self, x: Array) -> Array:
        self.x = x
        return x @ self.params["W"] + self.params["b"]

    def backward(self, dout: Array) -> Array:
        x = self.x
        np.matmul(x.T, dout, out=self.grads["W"])
        np.sum(dout, axis=0, out=self.grads["b"])
        return dout @ self.params["W"].T


class Activation(Layer):
    """An elementwise gate applied to a batch: out = gate.forward(x), same shape (N, H).

    backward: dx = gate.backward(dout, x, out) = dout * local gradient, elementwise.
    """

    def __init__(self, gate: gates.Gate) -> None:
        super().__init__()
        self.gate = gate
        self.x: Array | None = None
        self.out: Array | None = None

    def forward(self, x: Array) -> Array:
        self.x = x
        self.out = self.gate.forward(x)
        return self.out

    def backward(self, dout: Array) -> Array:
        return self.gate.backward(dout, self.x, self.out)

    def kink_state(self) -> Array | None:
        if self.gate.kink is None:
            return None
        return self.x > self.gate.kink

    def __repr__(self) -> str:
        return f"Activation({self.gate!r})"


class Maxout(Layer):
    """Maxout: k affine pieces per unit, out = max over the pieces.

    W (D, H*k) and b (H*k,), where column h*k + j is piece j of unit h.
    forward: x (N, D) -> z (N, H, k) -> out (N, H). backward: the max gate routes dout
    (N, H) to the winning piece only, then the affine backward as in `Linear`.
    """

    weight_keys = ("W",)

    def __init__(self, W: Array, b: Array, pieces: int) -> None:
        super().__init__()
        if W.shape[1] % pieces:
            raise ValueError(f"Maxout: W has {W.shape[1]} columns, not a multiple of {pieces}")
        self.pieces = pieces
        self.params = {"W": W, "b": b}
        self.grads = {"W": np.zeros_like(W), "b": np.zeros_like(b)}
        self.x: Array | None = None
        self.argmax: Array | None = None

    def forward(self, x: Array) -> Array:
        self.x = x
        z = (x @ self.params["W"] + self.params["b"]).reshape(x.shape[0], -1, self.pieces)
        self.argmax = z.argmax(axis=2)
        return np.take_along_axis(z, self.argmax[..., None], axis=2)[..., 0]

    def backward(self, dout: Array) -> Array:
        n, h = dout.shape
        dz = np.zeros((n, h, self.pieces), dtype=dout.dtype)
        np.put_along_axis(dz, self.argmax[..., None], dout[..., None], axis=2)
        dz = dz.reshape(n, h * self.pieces)
        np.matmul(self.x.T, dz, out=self.grads["W"])
        np.sum(dz, axis=0, out=self.grads["b"])
        return dz @ self.params["W"].T

    def kink_state(self) -> Array | None:
        return self.argmax


ACTIVATIONS = ("relu", "leaky_relu", "elu", "sigmoid", "tanh", "maxout")


def activation_gate(name: str, leaky_slope: float = 0.01, elu_alpha: float = 1.0) -> gates.Gate:
    """The elementwise gate of an activation name (maxout has no gate: it is a layer)."""
    table = {
        "relu": lambda: gates.ReLU(),
        "leaky_relu": lambda: gates.LeakyReLU(leaky_slope),
        "elu": lambda: gates.ELU(elu_alpha),
        "sigmoid": lambda: gates.Sigmoid(),
        "tanh": lambda: gates.Tanh(),
    }
    if name not in table:
        raise ValueError(f"activation={name!r} has no elementwise gate; allowed: {sorted(table)}")
    return table[name]()
