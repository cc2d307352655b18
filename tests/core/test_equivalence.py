"""mlp-lab's optimized training step computes what a plain, obviously-correct MLP computes.

The reference below is written for clarity only and shares no math with `mlp`: fresh
arrays everywhere, each activation's textbook derivative, log-sum-exp softmax and hinge
losses, normalization backpropagated stage by stage through mean, variance and std, and
each optimizer's update formula on whole arrays. In float64 the model's loss, every
gradient, the parameters after several optimizer steps, the BatchNorm running statistics
and the evaluation scores must agree with it to a relative error below 1e-10 -- for every
activation, both losses, 0-2 hidden layers, BatchNorm/LayerNorm and (frozen or per-step)
dropout masks. Changing batch sizes and evaluation passes between the steps prove that no
reused buffer leaks stale values into a later result or overwrites one handed out earlier.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from mlp.core import elementwise
from mlp.core.layers import Dropout
from mlp.core.model import MLP
from mlp.core.optim import SGD, Adam, Momentum, Nesterov, RMSProp

TOL = 1e-10
D, C, N = 20, 5, 16
HIDDEN = (16, 12)
EPS_NORM = 1e-5
BN_MOMENTUM = 0.9
ACTIVATIONS = ("relu", "leaky_relu", "elu", "sigmoid", "tanh", "maxout")

Array = np.ndarray


def rel_err(a, b, floor: float = 1e-300) -> float:
    """max|a - b| / max(|a| + |b|): relative to the arrays' scale, so exact zeros pass."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(a) + np.abs(b))), floor))


def assert_close(got, want, what: str, floor: float = 1e-300) -> None:
    err = rel_err(got, want, floor)
    assert err < TOL, f"{what}: relative error {err:.3e} >= {TOL:.0e}"


@dataclass(frozen=True)
class Net:
    """One architecture, from which both the model and the reference are built."""

    depth: int = 2
    activation: str = "relu"
    loss: str = "softmax"
    reg: float = 0.05
    norm: str | None = None
    dropout: float = 0.0
    slope: float = 0.01
    alpha: float = 1.0
    pieces: int = 2

    def build(self, seed: int = 0) -> MLP:
        model = MLP(D, HIDDEN[:self.depth], C, activation=self.activation, loss=self.loss,
                    reg=self.reg, dtype="float64", seed=seed, dropout=self.dropout,
                    norm=self.norm, leaky_slope=self.slope, elu_alpha=self.alpha,
                    maxout_pieces=self.pieces)
        # Zero biases and unit gammas would hide a bias or gamma that is dropped or
        # misrouted, so every parameter gets a generic value (in place: the layers' arrays).
        rng = np.random.default_rng([seed, 99])
        for name, p in model.params.items():
            if name.startswith(("b", "beta")):
                p[...] = 0.2 * rng.standard_normal(p.shape)
            elif name.startswith("gamma"):
                p[...] = 1 + 0.3 * rng.standard_normal(p.shape)
        return model


def net_id(net: Net) -> str:
    return f"{net.activation}-{net.loss}-depth{net.depth}-norm{net.norm}-dropout{net.dropout}"


def batch(rng: np.random.Generator, n: int) -> tuple[Array, Array]:
    return rng.standard_normal((n, D)), rng.integers(0, C, n)


def dropout_masks(model: MLP) -> list[Array]:
    """The masks the Dropout layers applied in the last training pass (scale included)."""
    return [layer.mask.copy() for layer in model.layers if isinstance(layer, Dropout)]


# -- the reference -----------------------------------------------------------------------------

def act(net: Net, u: Array) -> Array:
    if net.activation == "relu":
        return np.maximum(u, 0.0)
    if net.activation == "leaky_relu":
        return np.where(u > 0, u, net.slope * u)
    if net.activation == "elu":
        return np.where(u > 0, u, net.alpha * (np.exp(np.minimum(u, 0.0)) - 1))
    if net.activation == "sigmoid":
        return 1 / (1 + np.exp(-u))
    assert net.activation == "tanh"
    return np.tanh(u)


def act_derivative(net: Net, u: Array, a: Array) -> Array:
    if net.activation == "relu":
        return (u > 0).astype(np.float64)
    if net.activation == "leaky_relu":
        return np.where(u > 0, 1.0, net.slope)
    if net.activation == "elu":
        # alpha e^u, not the model's shortcut out + alpha
        return np.where(u > 0, 1.0, net.alpha * np.exp(np.minimum(u, 0.0)))
    if net.activation == "sigmoid":
        return a * (1 - a)
    return 1 - a**2


def norm_forward(z: Array, gamma: Array, beta: Array, axis: int,
                 stats: tuple[Array, Array] | None = None):
    """gamma * (z - mean) / sqrt(var + eps) + beta over `axis`; `stats`: given mean, var."""
    if stats is None:
        mean = z.mean(axis=axis, keepdims=True)
        zc = z - mean
        var = (zc**2).mean(axis=axis, keepdims=True)  # biased, as in training-mode BatchNorm
    else:
        mean, var = stats
        zc = z - mean
    std = np.sqrt(var + EPS_NORM)
    xhat = zc / std
    return gamma * xhat + beta, (zc, std, xhat, mean, var)


def norm_backward(dout: Array, gamma: Array, cache, axis: int):
    """Stage by stage through xhat = zc / std, std = sqrt(var + eps), var = mean(zc^2),
    zc = z - mean(z): a different route from the model's one-line compact formula."""
    zc, std, xhat, _, _ = cache
    n = zc.shape[axis]
    dgamma, dbeta = (dout * xhat).sum(axis=0), dout.sum(axis=0)
    dxhat = dout * gamma
    dzc = dxhat / std
    dstd = -(dxhat * zc).sum(axis=axis, keepdims=True) / std**2
    dvar = dstd / (2 * std)
    dzc = dzc + 2 * zc / n * dvar
    dmean = -dzc.sum(axis=axis, keepdims=True)
    return dzc + dmean / n, dgamma, dbeta


def reference_forward(net: Net, params: dict, X: Array, training: bool = True,
                      masks: list[Array] | None = None, running: dict | None = None):
    """Scores, the per-layer caches for the backward, and BatchNorm's batch statistics."""
    axis = {"batch": 0, "layer": 1}.get(net.norm)
    h, caches, batch_stats = X, [], {}
    for i in range(1, net.depth + 1):
        z = h @ params[f"W{i}"] + params[f"b{i}"]
        u, ncache = z, None
        if net.norm is not None:
            given = running[i] if net.norm == "batch" and not training else None
            u, ncache = norm_forward(z, params[f"gamma{i}"], params[f"beta{i}"], axis, given)
            if net.norm == "batch" and training:
                batch_stats[i] = (ncache[3], ncache[4])
        if net.activation == "maxout":
            grouped = u.reshape(len(u), -1, net.pieces)  # column h*k + j: piece j of unit h
            winner = grouped.argmax(axis=2)
            a = grouped.max(axis=2)
        else:
            winner, a = None, act(net, u)
        caches.append((h, u, a, winner, ncache))
        if training and masks:
            a = a * masks[i - 1]
        h = a
    L = net.depth + 1
    return h @ params[f"W{L}"] + params[f"b{L}"], (h, caches), batch_stats


@dataclass
class Reference:
    loss: float  # mean data loss + reg * sum of squared weights
    grads: dict  # of the loss
    data_grads: dict  # of the data loss alone
    batch_stats: dict  # BatchNorm's (mean, var) of the batch, by layer
    bias_terms: dict  # sum_n |dz|, the size of the terms summed into each hidden bias grad


def reference_loss_and_grads(net: Net, params: dict, X: Array, y: Array,
                             masks: list[Array] | None = None) -> Reference:
    scores, (h, caches), batch_stats = reference_forward(net, params, X, masks=masks)
    n, rows = len(y), np.arange(len(y))
    if net.loss == "softmax":
        m = scores.max(axis=1, keepdims=True)
        log_z = m + np.log(np.exp(scores - m).sum(axis=1, keepdims=True))
        data_loss = np.mean(log_z[:, 0] - scores[rows, y])
        dscores = np.exp(scores - log_z)
        dscores[rows, y] -= 1
    else:
        margins = np.maximum(0.0, scores - scores[rows, y][:, None] + 1)
        margins[rows, y] = 0
        data_loss = margins.sum() / n
        dscores = (margins > 0).astype(np.float64)
        dscores[rows, y] = -dscores.sum(axis=1)
    dscores /= n

    L = net.depth + 1
    grads = {f"W{L}": h.T @ dscores, f"b{L}": dscores.sum(axis=0)}
    bias_terms = {}
    dh = dscores @ params[f"W{L}"].T
    for i in range(net.depth, 0, -1):
        h_in, u, a, winner, ncache = caches[i - 1]
        if masks:
            dh = dh * masks[i - 1]
        if net.activation == "maxout":
            du = np.zeros((len(u), u.shape[1] // net.pieces, net.pieces))
            np.put_along_axis(du, winner[..., None], dh[..., None], axis=2)
            du = du.reshape(u.shape)
        else:
            du = dh * act_derivative(net, u, a)
        dz = du
        if net.norm is not None:
            axis = 0 if net.norm == "batch" else 1
            dz, grads[f"gamma{i}"], grads[f"beta{i}"] = norm_backward(
                du, params[f"gamma{i}"], ncache, axis)
        grads[f"W{i}"] = h_in.T @ dz
        grads[f"b{i}"] = dz.sum(axis=0)
        bias_terms[f"b{i}"] = float(np.abs(dz).sum(axis=0).max())
        dh = dz @ params[f"W{i}"].T

    weights = [k for k in params if k.startswith("W")]
    loss = data_loss + net.reg * sum(np.sum(params[k] ** 2) for k in weights)
    total = {k: g + 2 * net.reg * params[k] if k in weights else g for k, g in grads.items()}
    return Reference(loss, total, grads, batch_stats, bias_terms)


def update_running(running: dict, batch_stats: dict) -> dict:
    return {i: (BN_MOMENTUM * running[i][0] + (1 - BN_MOMENTUM) * mean,
                BN_MOMENTUM * running[i][1] + (1 - BN_MOMENTUM) * var)
            for i, (mean, var) in batch_stats.items()}


def fresh_running(net: Net, model: MLP) -> dict:
    return {i: (np.zeros((1, model.params[f"gamma{i}"].size)),
                np.ones((1, model.params[f"gamma{i}"].size)))
            for i in range(1, net.depth + 1)} if net.norm == "batch" else {}


OPTIMIZERS = {  # non-default hyperparameters, so one that is ignored shows
    "sgd": (SGD, {}),
    "momentum": (Momentum, {"momentum": 0.8}),
    "nesterov": (Nesterov, {"momentum": 0.8}),
    "rmsprop": (RMSProp, {"decay_rate": 0.95, "eps": 1e-8}),
    "adam": (Adam, {"beta1": 0.85, "beta2": 0.99, "eps": 1e-8}),
}


def reference_update(name: str, p: Array, g: Array, state: dict, lr: float, t: int) -> Array:
    """cs231n's update rules, one whole array at a time; returns the new parameter."""
    hp = OPTIMIZERS[name][1]
    zeros = np.zeros_like(p)
    if name == "sgd":
        return p - lr * g
    if name == "momentum":
        state["v"] = hp["momentum"] * state.get("v", zeros) - lr * g
        return p + state["v"]
    if name == "nesterov":
        v_prev = state.get("v", zeros)
        state["v"] = hp["momentum"] * v_prev - lr * g
        return p - hp["momentum"] * v_prev + (1 + hp["momentum"]) * state["v"]
    if name == "rmsprop":
        d = hp["decay_rate"]
        state["cache"] = d * state.get("cache", zeros) + (1 - d) * g**2
        return p - lr * g / (np.sqrt(state["cache"]) + hp["eps"])
    b1, b2 = hp["beta1"], hp["beta2"]
    state["m"] = b1 * state.get("m", zeros) + (1 - b1) * g
    state["v"] = b2 * state.get("v", zeros) + (1 - b2) * g**2
    m_hat, v_hat = state["m"] / (1 - b1**t), state["v"] / (1 - b2**t)
    return p - lr * m_hat / (np.sqrt(v_hat) + hp["eps"])


# -- comparisons -------------------------------------------------------------------------------

def assert_grads_match(net: Net, grads: dict, ref: Reference, what: str,
                       data_only: bool = False) -> None:
    want = ref.data_grads if data_only else ref.grads
    assert grads.keys() == want.keys(), (sorted(grads), sorted(want))
    for k in want:
        floor = 1e-300
        if k in noise_only_biases(net):
            # A bias in front of BatchNorm has gradient exactly 0 (the batch mean absorbs
            # it): both sides hold only rounding noise of a sum of terms of size
            # sum_n |dz|, which is therefore the scale the error is measured against.
            floor = ref.bias_terms[k]
        assert_close(grads[k], want[k], f"{what} grad {k}", floor)


def noise_only_biases(net: Net) -> list[str]:
    """Biases the net's function does not depend on: those in front of BatchNorm."""
    return [f"b{i}" for i in range(1, net.depth + 1)] if net.norm == "batch" else []


def assert_params_match(model: MLP, params: dict, what: str, skip=()) -> None:
    assert model.params.keys() == params.keys()
    for k in params:
        if k not in skip:
            assert_close(model.params[k], params[k], f"{what} param {k}")


def assert_running_match(model: MLP, running: dict, what: str, mean_slack=None) -> None:
    """`mean_slack[i]`: an absolute error allowed on top of the relative one (see run_steps)."""
    for i, (mean, var) in running.items():
        got, slack = model.buffers[f"running_mean{i}"], (mean_slack or {}).get(i, 0.0)
        err = np.abs(got - mean[0]).max()
        scale = np.max(np.abs(got) + np.abs(mean[0]))
        assert err <= slack + TOL * scale, \
            f"{what} running_mean{i}: |diff| {err:.3e}, rel {err / scale:.3e}, slack {slack:.3e}"
        assert_close(model.buffers[f"running_var{i}"], var[0], f"{what} running_var{i}")


# -- 1. one pass: loss and every gradient -------------------------------------------------------

@pytest.mark.parametrize("depth", [0, 1, 2])
@pytest.mark.parametrize("loss", ["softmax", "svm"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_loss_and_grads_match_reference(activation: str, loss: str, depth: int):
    # Non-default gate parameters: a gate that ignored them would still pass at defaults.
    net = Net(depth=depth, activation=activation, loss=loss, reg=0.05, slope=0.1, alpha=0.7,
              pieces=3)
    model = net.build(seed=depth)
    X, y = batch(np.random.default_rng(7), N)
    params = {k: v.copy() for k, v in model.params.items()}

    got_loss, grads = model.loss_and_grads(X, y)
    ref = reference_loss_and_grads(net, params, X, y)
    assert_close(got_loss, ref.loss, "loss")
    assert_grads_match(net, grads, ref, "")
    assert_close(model.scores(X), reference_forward(net, params, X)[0], "eval scores")


# -- 2. several optimizer steps -----------------------------------------------------------------

BATCHES = (16, 16, 11, 16, 7)  # a smaller batch mid-run and a different last one
LRS = (1e-2, 2e-2, 1.5e-2, 1e-2, 5e-3)  # as a schedule would vary it


def run_steps(net: Net, name: str, path: str, seed: int = 1) -> None:
    """Trains the model and the reference side by side, comparing after every step, with an
    evaluation pass of yet another batch size in between."""
    model = net.build(seed=seed)
    cls, hp = OPTIMIZERS[name]
    optimizer = cls(model.params, **hp)
    params = {k: v.copy() for k, v in model.params.items()}
    states: dict[str, dict] = {k: {} for k in params}
    running = fresh_running(net, model)
    rng = np.random.default_rng([seed, 3])
    X_eval = rng.standard_normal((9, D))
    # RMSProp and Adam divide a gradient by about sqrt(mean g^2) + eps, so on a gradient that
    # is rounding noise (~1e-17, the biases in front of BatchNorm) they turn the noise into
    # steps of up to lr * |noise| / eps, which differ between any two correct
    # implementations. Those biases are held to that bound: |update| <= lr * max_s |g_s| /
    # eps on each side, summed over the steps. Nothing in training mode depends on them;
    # BatchNorm's running mean does (it averages z = h W + b), so it gets the bound as slack.
    noise_only = noise_only_biases(net) if name in ("rmsprop", "adam") else []
    g_max = {k: [0.0, 0.0] for k in noise_only}
    bound = dict.fromkeys(noise_only, 0.0)
    for t, (n, lr) in enumerate(zip(BATCHES, LRS, strict=True), start=1):
        X, y = batch(rng, n)
        if path == "loss_and_grads":  # the public API
            loss, grads = model.loss_and_grads(X, y)
            optimizer.step(model.params, grads, lr)
        else:  # Trainer.fit's lines: the L2 term folded into the optimizer's pass
            loss, grads = model.backprop(X, y)
            loss += optimizer.step(model.params, grads, lr, l2=model.l2_coefficients())
        masks = dropout_masks(model) if net.dropout else None

        ref = reference_loss_and_grads(net, params, X, y, masks)
        running = update_running(running, ref.batch_stats)
        params = {k: reference_update(name, params[k], ref.grads[k], states[k], lr, t)
                  for k in params}
        assert_close(loss, ref.loss, f"step {t} loss")
        # after the step, which must leave the gradients alone
        assert_grads_match(net, grads, ref, f"step {t}", data_only=path == "fused_l2")
        assert_params_match(model, params, f"step {t}", skip=noise_only)
        for k in noise_only:
            g_max[k] = [max(g_max[k][0], np.abs(grads[k]).max()),
                        max(g_max[k][1], np.abs(ref.grads[k]).max())]
            bound[k] += lr * sum(g_max[k]) / hp["eps"]
            diff = np.abs(model.params[k] - params[k]).max()
            assert diff <= bound[k], f"step {t} param {k}: |diff| {diff:.3e} > {bound[k]:.3e}"
        slack = {int(k[1:]): bound[k] for k in noise_only}
        assert_running_match(model, running, f"step {t}", slack)
        eval_params, eval_running = params, running
        if noise_only:
            # Evaluation-mode BatchNorm sees b - running_mean, so the noise held to `bound`
            # above would show in the scores too (~6e-11 of their scale, measured); given
            # the model's own values of those two, the rest must agree to TOL.
            eval_params = {**params, **{k: model.params[k].copy() for k in noise_only}}
            eval_running = {i: (model.buffers[f"running_mean{i}"][None, :].copy(), var)
                            for i, (_, var) in running.items()}
        assert_close(model.scores(X_eval),
                     reference_forward(net, eval_params, X_eval, training=False,
                                       running=eval_running)[0],
                     f"step {t} eval scores")


@pytest.mark.parametrize("path", ["loss_and_grads", "fused_l2"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_training_steps_match_reference(name: str, path: str, monkeypatch: pytest.MonkeyPatch):
    # Chunks far smaller than W1 (and not dividing any size) so the optimizer's chunked
    # pass really crosses chunk boundaries and ends on a partial chunk. raising=False: if
    # the constant is renamed the test still checks equivalence, on whole arrays.
    monkeypatch.setattr(elementwise, "CHUNK", 37, raising=False)
    run_steps(Net(depth=2, activation="relu", reg=0.01), name, path)


# -- 3. stale buffers ---------------------------------------------------------------------------

BUFFER_NETS = [
    Net(depth=0),
    Net(depth=2, activation="tanh"),
    Net(depth=2, activation="maxout"),
    Net(depth=2, activation="elu", loss="svm"),
    Net(depth=2, norm="batch"),
    Net(depth=2, activation="maxout", norm="layer"),
]


@pytest.mark.parametrize("net", BUFFER_NETS, ids=net_id)
def test_interleaved_calls_of_other_batch_sizes_change_nothing(net: Net):
    model = net.build(seed=2)
    params = {k: v.copy() for k, v in model.params.items()}
    rng = np.random.default_rng(5)
    XA, yA = batch(rng, N)
    XB, yB = batch(rng, 5)
    X_eval = rng.standard_normal((9, D))
    XA_kept, yA_kept = XA.copy(), yA.copy()

    first_loss, grads = model.loss_and_grads(XA, yA)
    first = {k: g.copy() for k, g in grads.items()}  # to compare with a later call's
    model.scores(X_eval)
    loss_b, grads_b = model.loss_and_grads(XB, yB)
    for k in first:  # the arrays the first call returned are the caller's: left alone
        np.testing.assert_array_equal(grads[k], first[k], err_msg=f"grad {k} changed")
    # Another pass (evaluation, a third batch size) between backward and reading the grads
    # must not disturb them: e.g. a validation callback before the optimizer step.
    model.scores(X_eval)
    ref = reference_loss_and_grads(net, params, XB, yB)
    assert_close(loss_b, ref.loss, "second batch loss")
    assert_grads_match(net, grads_b, ref, "second batch")

    again_loss, again = model.loss_and_grads(XA, yA)
    ref = reference_loss_and_grads(net, params, XA, yA)
    assert_close(again_loss, ref.loss, "first batch again, loss")
    assert_grads_match(net, again, ref, "first batch again")
    assert_close(again_loss, first_loss, "first batch again vs first time, loss")
    for k in first:
        floor = ref.bias_terms[k] if k in noise_only_biases(net) else 1e-300
        assert_close(again[k], first[k], f"first batch again vs first time, grad {k}", floor)
    # The model reads its inputs and never writes to them.
    np.testing.assert_array_equal(XA, XA_kept)
    np.testing.assert_array_equal(yA, yA_kept)


@pytest.mark.parametrize("net", [*BUFFER_NETS, Net(depth=2, dropout=0.3)], ids=net_id)
def test_returned_scores_are_not_overwritten_later(net: Net):
    model = net.build(seed=3)
    rng = np.random.default_rng(6)
    X1, X2 = rng.standard_normal((8, D)), rng.standard_normal((8, D))
    eval_scores = model.scores(X1)
    train_scores = model.scores(X1, training=True)
    kept_eval, kept_train = eval_scores.copy(), train_scores.copy()
    # Same batch size first (a reused buffer would be handed out again), then others.
    model.scores(X2)
    model.scores(X2, training=True)
    model.loss_and_grads(X2, rng.integers(0, C, 8))
    model.scores(rng.standard_normal((3, D)))
    model.predict(rng.standard_normal((20, D)), batch_size=8)
    np.testing.assert_array_equal(eval_scores, kept_eval)
    np.testing.assert_array_equal(train_scores, kept_train)


# -- 4. normalization and dropout ---------------------------------------------------------------

@pytest.mark.parametrize("loss", ["softmax", "svm"])
@pytest.mark.parametrize("activation", ["relu", "tanh", "maxout"])
@pytest.mark.parametrize("norm", ["batch", "layer"])
def test_norm_loss_and_grads_match_reference(norm: str, activation: str, loss: str):
    net = Net(depth=2, activation=activation, loss=loss, norm=norm, reg=0.05)
    model = net.build(seed=4)
    params = {k: v.copy() for k, v in model.params.items()}
    X, y = batch(np.random.default_rng(8), N)

    got_loss, grads = model.loss_and_grads(X, y)
    ref = reference_loss_and_grads(net, params, X, y)
    assert_close(got_loss, ref.loss, "loss")
    assert_grads_match(net, grads, ref, "")
    running = update_running(fresh_running(net, model), ref.batch_stats)
    assert_running_match(model, running, "after one pass")
    assert_close(model.scores(X, training=True), reference_forward(net, params, X)[0],
                 "training-mode scores")
    # A training-mode pass moves the running statistics again, toward the same batch's.
    running = update_running(running, ref.batch_stats)
    assert_running_match(model, running, "after two passes")
    # Evaluation: BatchNorm with the running statistics, LayerNorm as in training.
    assert_close(model.scores(X),
                 reference_forward(net, params, X, training=False, running=running)[0],
                 "eval scores")


@pytest.mark.parametrize("norm", [None, "batch", "layer"])
@pytest.mark.parametrize("activation", ["relu", "maxout"])
def test_frozen_dropout_matches_reference(activation: str, norm: str | None):
    p = 0.3
    net = Net(depth=2, activation=activation, norm=norm, dropout=p, reg=0.05)
    model = net.build(seed=5)
    params = {k: v.copy() for k, v in model.params.items()}
    X, y = batch(np.random.default_rng(9), N)
    model.freeze_dropout()

    got_loss, grads = model.loss_and_grads(X, y)
    masks = dropout_masks(model)
    assert len(masks) == net.depth
    for mask in masks:  # inverted dropout: kept units scaled by 1 / (1 - p), some of each
        assert set(np.unique(mask)) <= {0.0, 1 / (1 - p)}
        assert 0 < np.count_nonzero(mask) < mask.size
    ref = reference_loss_and_grads(net, params, X, y, masks)
    assert_close(got_loss, ref.loss, "loss")
    assert_grads_match(net, grads, ref, "")

    # Frozen: the next pass reuses the masks, so it is the same function.
    again_loss, again = model.loss_and_grads(X, y)
    assert_close(again_loss, ref.loss, "second pass loss")
    assert_grads_match(net, again, ref, "second pass")
    for old, new in zip(masks, dropout_masks(model), strict=True):
        np.testing.assert_array_equal(old, new)


@pytest.mark.parametrize(("norm", "dropout"), [("batch", 0.0), ("layer", 0.0),
                                               ("batch", 0.25), ("layer", 0.25)])
@pytest.mark.parametrize("name", ["momentum", "adam"])
def test_norm_dropout_training_steps_match_reference(norm: str, dropout: float, name: str):
    # Unfrozen dropout (a fresh mask per step, read back from the layers), changing batch
    # sizes, BatchNorm's running statistics and evaluation passes in between.
    run_steps(Net(depth=2, activation="relu", norm=norm, dropout=dropout, reg=0.01),
              name, "fused_l2", seed=6)
