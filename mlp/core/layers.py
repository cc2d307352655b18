"""Layers: `Linear`, the activations of the lecture, `Maxout`, and the layers for
accuracy: `BatchNorm`, `LayerNorm` and `Dropout`.

Every layer has `forward(x)`, which caches what `backward(dout)` needs, and
`backward(dout)`, which returns dx and stores the parameter gradients in `grads` (keyed
like `params`). Both are vectorized over the batch. Activations apply the elementwise
gates of `gates.py` to whole arrays: the derivative rules are written once, there.

`training` (True unless set) says which function a layer computes; only `BatchNorm`
(batch statistics vs running statistics) and `Dropout` (random mask vs identity) differ
between the modes. The model sets it on every layer at each forward pass. `buffers`
holds state that is not trained but belongs to the model (BatchNorm's running
statistics): no gradient, but saved and copied with the parameters.

With `reuse_buffers` (off unless set; the model sets it on every layer but the last),
`Linear`, `Activation`, `BatchNorm` and `LayerNorm` write their outputs and input
gradients into arrays allocated once per shape and overwritten by the next pass, so the
training loop allocates nothing: an output stays valid until the layer's next forward, a
dx until its next backward.

`kink_state()` returns the branch each unit took in the last forward pass (which side of
a ReLU's 0, which Maxout piece), or None for smooth layers: the gradient check compares
it between x+h and x-h to spot coordinates that straddle a kink.
"""

from __future__ import annotations

import numpy as np

from mlp.core import blas, gates

Array = np.ndarray
Sink = tuple[Array, float, float]  # (C, alpha, beta): a gradient G lands as C = alpha G + beta C


class Layer:
    """Base class: no parameters, identity kink state."""

    params: dict[str, Array]
    grads: dict[str, Array]
    buffers: dict[str, Array]
    weight_keys: tuple[str, ...] = ()
    training: bool = True
    reuse_buffers: bool = False

    def __init__(self) -> None:
        self.params = {}
        self.grads = {}
        self.buffers = {}
        self._work: dict[str, Array] = {}

    def _out(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> Array | None:
        """The reused array `name` of that shape and dtype (allocated when either changes,
        e.g. for the last, smaller batch), or None (allocate) without `reuse_buffers`."""
        if not self.reuse_buffers:
            return None
        buf = self._work.get(name)
        if buf is None or buf.shape != shape or buf.dtype != dtype:
            buf = self._work[name] = np.empty(shape, dtype)
        return buf

    def forward(self, x: Array) -> Array:
        raise NotImplementedError

    def backward(self, dout: Array) -> Array:
        raise NotImplementedError

    def kink_state(self) -> Array | None:
        return None


class Linear(Layer):
    """Affine layer out = x @ W + b, W (D, H), b (H,).

    forward: x (N, D) -> out (N, H). backward: dout (N, H) -> dx (N, D), with
    grads["W"] = x^T dout (D, H) (the matrix-multiply gate, `gates.matmul_backward`) and
    grads["b"] = sum of dout over the batch (H,).
    With `input_grad = False` (the first layer of a net: nothing upstream needs dx)
    backward skips dout W^T, a third of the layer's backward work, and returns None.

    `backward(dout, into={"W": (C, alpha, beta), "b": (Cb, alpha, beta)})` is the training
    step's fused form: the weight gradient is not stored but accumulated by the GEMM that
    computes it into an optimizer's array, C = alpha * x^T dout + beta * C
    (`Optimizer.sinks`), and grads["W"] is left as it was; likewise the bias's,
    Cb = alpha * sum(dout) + beta * Cb (grads["b"] then holds alpha * sum(dout)). The
    reference form above is what it must equal.
    """

    weight_keys = ("W",)

    def __init__(self, W: Array, b: Array) -> None:
        super().__init__()
        self.params = {"W": W, "b": b}
        self.grads = {"W": np.zeros_like(W), "b": np.zeros_like(b)}
        self.input_grad = True
        self.x: Array | None = None

    def forward(self, x: Array) -> Array:
        self.x = x
        W = self.params["W"]
        # np.dot, not np.matmul: the same BLAS call in float32 and float64, and half the
        # time without BLAS (the gradient check's 80-bit forward passes: 0.67 -> 0.33 s).
        out = np.dot(x, W, out=self._out("out", (len(x), W.shape[1]), np.result_type(x, W)))
        out += self.params["b"]  # in place: no second (N, H) array
        return out

    def backward(self, dout: Array, into: dict[str, Sink] | None = None) -> Array | None:
        x, W = self.x, self.params["W"]
        db = np.sum(dout, axis=0, out=self.grads["b"])  # the add gate, summed over the batch
        dx = self._out("dx", x.shape, np.result_type(dout, W)) if self.input_grad else None
        if not into:
            return gates.matmul_backward(x, W, dout, da=dx, db=self.grads["W"],
                                         need_da=self.input_grad)[0]
        if "b" in into:
            c, alpha, beta = into["b"]
            if beta != 1:
                c *= beta
            c += np.multiply(db, alpha, out=db)
        # dx first: C may be W itself (plain SGD), which must not change before dout W^T.
        if self.input_grad:
            dx = np.matmul(dout, W.T, out=dx)
        if "W" in into:
            blas.gemm_tn(x, dout, *into["W"])
        else:
            np.matmul(x.T, dout, out=self.grads["W"])
        return dx


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
        self.out = self.gate.forward(x, out=self._out("out", x.shape, x.dtype))
        return self.out

    def backward(self, dout: Array) -> Array:
        dx = self._out("dx", dout.shape, np.result_type(dout, self.x))
        return self.gate.backward(dout, self.x, self.out, dx=dx)

    def kink_state(self) -> Array | None:
        if self.gate.kink is None:
            return None
        return self.x > self.gate.kink

    def __repr__(self) -> str:
        return f"Activation({self.gate!r})"


class PieceMax(Layer):
    """The max gate of Maxout on its own: the max over groups of k consecutive columns.

    forward: z (N, H*k) -> out (N, H), where column h*k + j is piece j of unit h.
    backward: the max gate routes dout (N, H) to the winning piece only -> dz (N, H*k).
    """

    def __init__(self, pieces: int) -> None:
        super().__init__()
        self.pieces = pieces
        self.argmax: Array | None = None

    def forward(self, x: Array) -> Array:
        z = x.reshape(x.shape[0], -1, self.pieces)
        self.argmax = z.argmax(axis=2)
        return np.take_along_axis(z, self.argmax[..., None], axis=2)[..., 0]

    def backward(self, dout: Array) -> Array:
        n, h = dout.shape
        dz = np.zeros((n, h, self.pieces), dtype=dout.dtype)
        np.put_along_axis(dz, self.argmax[..., None], dout[..., None], axis=2)
        return dz.reshape(n, h * self.pieces)

    def kink_state(self) -> Array | None:
        return self.argmax

    def __repr__(self) -> str:
        return f"PieceMax({self.pieces})"


class Maxout(Linear):
    """Maxout: k affine pieces per unit, out = max over the pieces (`Linear`, then
    `PieceMax`).

    W (D, H*k) and b (H*k,), where column h*k + j is piece j of unit h.
    forward: x (N, D) -> z (N, H*k) -> out (N, H). backward: the max gate routes dout
    (N, H) to the winning piece only, then the affine backward of `Linear`.
    """

    def __init__(self, W: Array, b: Array, pieces: int) -> None:
        if W.shape[1] % pieces:
            raise ValueError(f"Maxout: W has {W.shape[1]} columns, not a multiple of {pieces}")
        super().__init__(W, b)
        self.max = PieceMax(pieces)

    def forward(self, x: Array) -> Array:
        return self.max.forward(super().forward(x))

    def backward(self, dout: Array, into: dict[str, Sink] | None = None) -> Array:
        return super().backward(self.max.backward(dout), into)

    def kink_state(self) -> Array | None:
        return self.max.kink_state()


class _Normalization(Layer):
    """What BatchNorm and LayerNorm share: out = gamma * xhat + beta, where
    xhat = (x - mean) / sqrt(var + eps) and mean, var are taken over `axis` of the batch
    (0: per feature, over the samples; 1: per sample, over the features) or given.

    gamma (D,) starts at 1 and beta (D,) at 0, so a fresh layer only normalizes.
    forward: x (N, D) -> out (N, D). backward: dout (N, D) -> dx (N, D), with
    grads["gamma"] = sum of dout * xhat over the batch (D,), grads["beta"] = sum of dout
    (D,). When mean and var came from x itself, dx is the compact cs231n formula
    dx = (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)) / std (means over `axis`,
    dxhat = dout * gamma): the paths through the mean and the variance in one line;
    with given statistics it is dxhat / std.
    """

    axis: int

    def __init__(self, dim: int, eps: float = 1e-5, dtype: np.dtype | type = np.float64) -> None:
        super().__init__()
        self.eps = float(eps)  # a Python float, so float32 arrays stay float32
        self.params = {"gamma": np.ones(dim, dtype=dtype), "beta": np.zeros(dim, dtype=dtype)}
        self.grads = {k: np.zeros_like(p) for k, p in self.params.items()}
        self.xhat: Array | None = None
        self.var: Array | None = None  # of the last forward: BatchNorm's running update
        self.std: Array | None = None
        self.batch_stats = True

    def _sum(self, a: Array, b: Array) -> Array:
        """sum of a * b over `axis`, keepdims, without forming the (N, D) product."""
        if self.axis == 0:
            return np.einsum("ij,ij->j", a, b)[None, :]
        return np.einsum("ij,ij->i", a, b)[:, None]

    def normalize(self, x: Array, mean: Array, var: Array | None, batch_stats: bool) -> Array:
        """out from x and its mean (keepdims) and variance; var=None: the biased variance
        of x itself, computed here from the centered values. Caches what backward needs."""
        self.batch_stats = batch_stats
        xhat = np.subtract(x, mean, out=self._out("xhat", x.shape, x.dtype))
        if var is None:
            var = self._sum(xhat, xhat) / x.shape[self.axis]
        self.var = var
        self.std = np.sqrt(var + self.eps)
        xhat /= self.std
        self.xhat = xhat
        out = np.multiply(xhat, self.params["gamma"], out=self._out("out", x.shape, x.dtype))
        out += self.params["beta"]
        return out

    def backward(self, dout: Array) -> Array:
        xhat, gamma = self.xhat, self.params["gamma"]
        np.einsum("ij,ij->j", dout, xhat, out=self.grads["gamma"])
        np.sum(dout, axis=0, out=self.grads["beta"])
        dx = np.multiply(dout, gamma, out=self._out("dx", dout.shape, dout.dtype))  # dxhat
        if self.batch_stats:
            mean_dxhat, mean_dxhat_xhat = self._dxhat_means(dx, xhat)
            dx -= mean_dxhat
            dx -= np.multiply(xhat, mean_dxhat_xhat, out=self._out("tmp", dx.shape, dx.dtype))
        dx /= self.std
        return dx

    def _dxhat_means(self, dxhat: Array, xhat: Array) -> tuple[Array, Array]:
        """mean(dxhat) and mean(dxhat * xhat) over `axis`, keepdims."""
        n = dxhat.shape[self.axis]
        return dxhat.sum(axis=self.axis, keepdims=True) / n, self._sum(dxhat, xhat) / n


class BatchNorm(_Normalization):
    """Batch normalization (Ioffe & Szegedy 2015), as in cs231n: per feature, over the batch.

    Training: the batch's mean and (biased) variance per feature, and the running
    statistics move toward them, running = momentum * running + (1 - momentum) * batch.
    Evaluation: the running statistics, so each sample's output depends on it alone.
    buffers["running_mean"] (D,) starts at 0, buffers["running_var"] (D,) at 1.
    Shapes and backward as in `_Normalization`, with axis 0.
    """

    axis = 0

    def __init__(self, dim: int, momentum: float = 0.9, eps: float = 1e-5,
                 dtype: np.dtype | type = np.float64) -> None:
        super().__init__(dim, eps, dtype)
        self.momentum = float(momentum)
        self.buffers = {"running_mean": np.zeros(dim, dtype=dtype),
                        "running_var": np.ones(dim, dtype=dtype)}

    def forward(self, x: Array) -> Array:
        running_mean, running_var = self.buffers["running_mean"], self.buffers["running_var"]
        if not self.training:
            return self.normalize(x, running_mean, running_var, batch_stats=False)
        mean = x.mean(axis=0, keepdims=True)
        out = self.normalize(x, mean, None, batch_stats=True)
        m = self.momentum
        running_mean *= m
        running_mean += (1 - m) * mean[0]
        running_var *= m
        running_var += (1 - m) * self.var[0]
        return out

    def _dxhat_means(self, dxhat: Array, xhat: Array) -> tuple[Array, Array]:
        # Over the batch, these are gamma times the sums the parameter gradients already
        # hold (sum dout = grads["beta"], sum dout * xhat = grads["gamma"]): no pass needed.
        n, gamma = len(dxhat), self.params["gamma"]
        return gamma * self.grads["beta"] / n, gamma * self.grads["gamma"] / n

    def __repr__(self) -> str:
        return (f"BatchNorm({len(self.params['gamma'])}, momentum={self.momentum}, "
                f"eps={self.eps})")


class LayerNorm(_Normalization):
    """Layer normalization (Ba et al. 2016): per sample, over its features; the same
    function in training and evaluation. Shapes and backward as in `_Normalization`,
    with axis 1.
    """

    axis = 1

    def forward(self, x: Array) -> Array:
        return self.normalize(x, x.mean(axis=1, keepdims=True), None, batch_stats=True)

    def __repr__(self) -> str:
        return f"LayerNorm({len(self.params['gamma'])}, eps={self.eps})"


class Dropout(Layer):
    """Inverted dropout: in training each unit is kept with probability 1 - p and scaled
    by 1 / (1 - p), so the expected output is x and evaluation is the identity.

    forward: x (N, H) -> out = x * mask (N, H), mask drawn from `rng` (uniforms drawn in
    float64 whatever the dtype, so nets of one seed in any dtype draw the same masks).
    backward: dx = dout * mask (the mul gate: the gradient flows through kept units
    only). `freeze()` makes the next training forward draw a mask and every later one
    reuse it, so the layer is a fixed function (for gradient checks); `freeze(False)`
    draws anew at every forward again.
    """

    def __init__(self, p: float, rng: np.random.Generator) -> None:
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"Dropout: p={p!r} is not allowed: expected a number in [0, 1)")
        self.p = float(p)
        self.rng = rng
        self.frozen = False
        self.mask: Array | None = None
        self.active = False

    def freeze(self, frozen: bool = True) -> None:
        """Reuse one mask (drawn at the next training forward) until `freeze(False)`."""
        self.frozen = frozen
        self.mask = None

    def forward(self, x: Array) -> Array:
        self.active = self.training
        if not self.active:
            return x
        if not self.frozen or self.mask is None:
            self.mask = (self.rng.random(x.shape) >= self.p).astype(x.dtype)
            self.mask *= 1 / (1 - self.p)
        elif self.mask.shape != x.shape:
            raise ValueError(f"Dropout: the frozen mask has shape {self.mask.shape}, the "
                             f"batch {x.shape}")
        return x * self.mask

    def backward(self, dout: Array) -> Array:
        return dout * self.mask if self.active else dout

    def __repr__(self) -> str:
        return f"Dropout(p={self.p})"


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
