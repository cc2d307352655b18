"""The computational graph of cs231n lecture 4: gates, local gradients and the chain rule.

Each derivative rule is written once, here, and the layers that train apply it:

* Elementwise gates (`Sigmoid`, `Tanh`, `ReLU`, `LeakyReLU`, `ELU`, and `Exp`,
  `Reciprocal`, `Scale` of the lecture's sigmoid circuit): a forward formula and its local
  gradient. `layers.Activation` applies the first five to whole batches, so the gate of
  the lecture and the activation that trains are the same code. Backward is always
  `dout * local_grad`, elementwise: the (diagonal) Jacobian is never built.
* `matmul_backward`, the matrix-multiply gate's rule, which `layers.Linear` uses.
* `Node`, a value in a small graph of gates, to replay the lecture's worked examples:
  gate functions (`add`, `mul`, `maximum`, `matmul`, `sqnorm`, `apply`) build the graph
  in the forward pass and attach each node's local backward step; `Node.backward()`
  walks the graph in reverse topological order. The lecture's patterns are visible in
  the code: add distributes the upstream gradient, mul swaps its inputs, max routes to
  the larger input, and a node used by several gates sums their gradients (`+=`).

`python -m mlp.gates` prints the lecture's worked examples, computed by this code.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

Array = np.ndarray


class Gate:
    """An elementwise gate y = f(x) with its local gradient dy/dx.

    `forward(x)` and `local_grad(x, out)` take arrays of any shape (N, ...) and return an
    array of the same shape; `backward(dout, x, out)` is the chain rule
    `dout * local_grad(x, out)`. `forward(x, out=buf)` and `backward(..., dx=buf)` write
    into a given array of that shape and dtype instead of allocating one (the training
    loop reuses its arrays). `kink` is the input where the derivative jumps (None for
    smooth gates); the gradient check uses it to skip coordinates that straddle it.
    """

    name = "gate"
    kink: float | None = None

    def forward(self, x: Array, out: Array | None = None) -> Array:
        raise NotImplementedError

    def local_grad(self, x: Array, out: Array) -> Array:
        raise NotImplementedError

    def backward(self, dout: Array, x: Array, out: Array, dx: Array | None = None) -> Array:
        return np.multiply(dout, self.local_grad(x, out), out=dx)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Scale(Gate):
    """y = c * x; the local gradient is the constant c."""

    name = "scale"

    def __init__(self, c: float) -> None:
        self.c = c

    def forward(self, x: Array, out: Array | None = None) -> Array:
        return np.multiply(x, self.c, out=out)

    def local_grad(self, x: Array, out: Array) -> Array:
        return np.full_like(x, self.c)

    def __repr__(self) -> str:
        return f"Scale({self.c})"


class Exp(Gate):
    """y = e^x; the local gradient is e^x, which is the output itself."""

    name = "exp"

    def forward(self, x: Array, out: Array | None = None) -> Array:
        return np.exp(x, out=out)

    def local_grad(self, x: Array, out: Array) -> Array:
        return out


class Reciprocal(Gate):
    """y = 1/x; the local gradient is -1/x^2 = -y^2."""

    name = "reciprocal"

    def forward(self, x: Array, out: Array | None = None) -> Array:
        return np.divide(1.0, x, out=out)

    def local_grad(self, x: Array, out: Array) -> Array:
        return -(out * out)


class Sigmoid(Gate):
    """y = 1 / (1 + e^-x); the local gradient is y (1 - y).

    Computed from e^-|x| so that no exponent overflows for large |x|.
    """

    name = "sigmoid"

    def forward(self, x: Array, out: Array | None = None) -> Array:
        z = np.exp(-np.abs(x))
        return _into(np.where(x >= 0, 1.0 / (1.0 + z), z / (1.0 + z)), out, z.dtype)

    def local_grad(self, x: Array, out: Array) -> Array:
        return out * (1.0 - out)


class Tanh(Gate):
    """y = tanh(x); the local gradient is 1 - y^2."""

    name = "tanh"

    def forward(self, x: Array, out: Array | None = None) -> Array:
        return np.tanh(x, out=out)

    def local_grad(self, x: Array, out: Array) -> Array:
        return 1.0 - out * out


class ReLU(Gate):
    """y = max(0, x): a max gate against 0, so the gradient is routed only where x > 0."""

    name = "relu"
    kink = 0.0

    def forward(self, x: Array, out: Array | None = None) -> Array:
        # Against a row of zeros rather than the scalar 0: the same values, but NumPy 2's
        # maximum runs its fast loop only on array operands (a 256 x 512 float32 batch
        # here: 30 us against 65-82 us with the scalar).
        return np.maximum(x, np.zeros(x.shape[-1:], x.dtype), out=out)

    def local_grad(self, x: Array, out: Array) -> Array:
        return (x > 0).astype(x.dtype)

    def backward(self, dout: Array, x: Array, out: Array, dx: Array | None = None) -> Array:
        # Routing: dout passes where the max chose x and is zeroed where it chose 0 (a
        # product with the 0/1 mask, which needs no float copy of the local gradient).
        return np.multiply(dout, x > 0, out=dx)


class LeakyReLU(Gate):
    """y = x for x > 0, slope * x otherwise; the local gradient is 1 or slope."""

    name = "leaky_relu"
    kink = 0.0

    def __init__(self, slope: float = 0.01) -> None:
        self.slope = slope

    def forward(self, x: Array, out: Array | None = None) -> Array:
        return _into(np.where(x > 0, x, self.slope * x), out, x.dtype)

    def local_grad(self, x: Array, out: Array) -> Array:
        return np.where(x > 0, 1.0, self.slope).astype(x.dtype, copy=False)

    def __repr__(self) -> str:
        return f"LeakyReLU(slope={self.slope})"


class ELU(Gate):
    """y = x for x > 0, alpha (e^x - 1) otherwise; the local gradient is 1 or y + alpha.

    `expm1` on min(x, 0) keeps large positive x from overflowing the unused branch.
    """

    name = "elu"
    kink = 0.0

    def __init__(self, alpha: float = 1.0) -> None:
        self.alpha = alpha

    def forward(self, x: Array, out: Array | None = None) -> Array:
        neg = self.alpha * np.expm1(np.minimum(x, 0))
        return _into(np.where(x > 0, x, neg), out, x.dtype)

    def local_grad(self, x: Array, out: Array) -> Array:
        return np.where(x > 0, 1.0, out + self.alpha).astype(x.dtype, copy=False)

    def __repr__(self) -> str:
        return f"ELU(alpha={self.alpha})"


def matmul_backward(a: Array, b: Array, dout: Array, da: Array | None = None,
                    db: Array | None = None, need_da: bool = True) -> tuple[Array | None, Array]:
    """The matrix-multiply gate out = a @ b, a (N, D), b (D, H), dout (N, H): each input gets
    the upstream gradient times the other input, transposed (the mul gate's swap for
    matrices): da = dout b^T (N, D), db = a^T dout (D, H). Written into `da` / `db` when
    given; without `need_da`, da is skipped (None).
    """
    db = np.matmul(a.T, dout, out=db)  # a.T is a view: BLAS reads it transposed
    return (np.matmul(dout, b.T, out=da) if need_da else None), db


def _into(value: Array, out: Array | None, dtype: np.dtype) -> Array:
    """value as `dtype` (np.where promotes float32 with a Python float), in `out` if given."""
    if out is None:
        return value.astype(dtype, copy=False)
    np.copyto(out, value, casting="same_kind")
    return out


# ---------------------------------------------------------------------------------------
# The graph


class Node:
    """A value in a computational graph (scalar or array) and the gradient of the output.

    `data` is a float64 array (0-d for scalars), `grad` has its shape. `parents` are the
    nodes this one was computed from and `_backward` pushes `self.grad` into their grads.
    """

    def __init__(self, data: Array | float, parents: tuple[Node, ...] = (), op: str = "") -> None:
        self.data = np.asarray(data, dtype=np.float64)
        self.grad = np.zeros_like(self.data)
        self.parents = parents
        self.op = op
        self._backward: Callable[[], None] = lambda: None

    def backward(self) -> None:
        """Backpropagate from this node: dself/dself = 1, then every gate in reverse order."""
        order: list[Node] = []
        seen: set[int] = set()

        def visit(node: Node) -> None:
            if id(node) in seen:
                return
            seen.add(id(node))
            for parent in node.parents:
                visit(parent)
            order.append(node)

        visit(self)
        for node in order:
            node.grad = np.zeros_like(node.data)
        self.grad = np.ones_like(self.data)
        for node in reversed(order):
            node._backward()

    def __add__(self, other: Node | float) -> Node:
        return add(self, other)

    __radd__ = __add__

    def __mul__(self, other: Node | float) -> Node:
        return mul(self, other)

    __rmul__ = __mul__

    def __matmul__(self, other: Node) -> Node:
        return matmul(self, other)

    def __neg__(self) -> Node:
        return apply(Scale(-1.0), self)

    def __repr__(self) -> str:
        return f"Node({self.data!r}, grad={self.grad!r}, op={self.op!r})"


def _node(value: Node | float | Array) -> Node:
    return value if isinstance(value, Node) else Node(value)


def add(a: Node | float, b: Node | float) -> Node:
    """a + b (same shapes). The add gate distributes: both inputs get the upstream grad."""
    a, b = _node(a), _node(b)
    out = Node(a.data + b.data, (a, b), "add")

    def _backward() -> None:
        a.grad += out.grad
        b.grad += out.grad

    out._backward = _backward
    return out


def mul(a: Node | float, b: Node | float) -> Node:
    """a * b elementwise. The mul gate swaps: each input gets the other times upstream."""
    a, b = _node(a), _node(b)
    out = Node(a.data * b.data, (a, b), "mul")

    def _backward() -> None:
        a.grad += b.data * out.grad
        b.grad += a.data * out.grad

    out._backward = _backward
    return out


def maximum(a: Node | float, b: Node | float) -> Node:
    """max(a, b) elementwise. The max gate routes the upstream grad to the larger input
    only (to `a` on a tie)."""
    a, b = _node(a), _node(b)
    a_wins = a.data >= b.data
    out = Node(np.where(a_wins, a.data, b.data), (a, b), "max")

    def _backward() -> None:
        a.grad += np.where(a_wins, out.grad, 0.0)
        b.grad += np.where(a_wins, 0.0, out.grad)

    out._backward = _backward
    return out


def apply(gate: Gate, x: Node | float) -> Node:
    """An elementwise gate on a node: out = gate(x), dx += dout * local_grad, no Jacobian."""
    x = _node(x)
    out = Node(gate.forward(x.data), (x,), gate.name)

    def _backward() -> None:
        x.grad += gate.backward(out.grad, x.data, out.data)

    out._backward = _backward
    return out


def matmul(W: Node, x: Node) -> Node:
    """W @ x for W (M, D) and x (D,) or (D, K): `matmul_backward`, dW = dout x^T,
    dx = W^T dout."""
    out = Node(W.data @ x.data, (W, x), "matmul")

    def _backward() -> None:
        columns = x.data.reshape(len(x.data), -1)  # a vector as one column
        dW, dx = matmul_backward(W.data, columns, out.grad.reshape(len(W.data), -1))
        W.grad += dW
        x.grad += dx.reshape(x.data.shape)

    out._backward = _backward
    return out


def sqnorm(q: Node) -> Node:
    """||q||^2 = sum of squares, a scalar; dq = 2 q dout."""
    out = Node(np.sum(q.data * q.data), (q,), "sqnorm")

    def _backward() -> None:
        q.grad += 2.0 * q.data * out.grad

    out._backward = _backward
    return out


def exp(x: Node | float) -> Node:
    """e^x as a gate."""
    return apply(Exp(), x)


def reciprocal(x: Node | float) -> Node:
    """1/x as a gate."""
    return apply(Reciprocal(), x)


def sigmoid(x: Node | float) -> Node:
    """The sigmoid as one gate, with the local gradient sigma (1 - sigma)."""
    return apply(Sigmoid(), x)


# ---------------------------------------------------------------------------------------
# The lecture's worked examples


def lecture_examples() -> dict[str, dict[str, float | list]]:
    """The worked examples of cs231n lecture 4, computed by the gates above: for each (by
    its formula and point), the output "f" and the gradient "df/d<input>" of every input
    (floats, or nested lists for arrays)."""
    examples = {}
    x, y, z = Node(-2.0), Node(5.0), Node(-4.0)
    examples["f = (x + y) z at x=-2, y=5, z=-4"] = _solve((x + y) * z, x=x, y=y, z=z)

    point = "at w=(2, -3, -3), x=(-1, -2)"
    for title, one_gate in (("gate by gate", False), ("as one sigmoid gate", True)):
        w0, x0, w1, x1, w2 = (Node(v) for v in (2.0, -1.0, -3.0, -2.0, -3.0))
        dot = w0 * x0 + w1 * x1 + w2
        f = sigmoid(dot) if one_gate else reciprocal(1.0 + exp(-dot))
        examples[f"f = 1 / (1 + e^-(w0 x0 + w1 x1 + w2)) {point}, {title}"] = _solve(
            f, w0=w0, w1=w1, w2=w2, x0=x0, x1=x1)

    x, y, z, w = Node(3.0), Node(-4.0), Node(2.0), Node(-1.0)
    examples["f = 2 (x y + max(z, w)) at x=3, y=-4, z=2, w=-1: add distributes, max routes, "
             "mul swaps"] = _solve(2.0 * (x * y + maximum(z, w)), x=x, y=y, z=z, w=w)

    W, v = Node([[0.1, 0.5], [-0.3, 0.8]]), Node([0.2, 0.4])
    examples["f = ||W x||^2 at W=[[0.1, 0.5], [-0.3, 0.8]], x=[0.2, 0.4]"] = _solve(
        sqnorm(W @ v), W=W, x=v)
    return examples


def _solve(f: Node, **inputs: Node) -> dict[str, float | list]:
    f.backward()
    return {"f": f.data.tolist(), **{f"df/d{k}": n.grad.tolist() for k, n in inputs.items()}}


def main() -> None:
    """Print `lecture_examples()`, four significant digits."""
    for title, values in lecture_examples().items():
        print(title)
        for name, value in values.items():
            label = f"  {name:<7} "
            shown = np.array2string(np.asarray(value), precision=4, suppress_small=True,
                                    prefix=label) if isinstance(value, list) else f"{value:.4g}"
            print(label + shown)


if __name__ == "__main__":
    main()
