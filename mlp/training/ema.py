"""Polyak averaging: an exponential moving average (EMA) of a model's weights.

After an update, avg = decay * avg + (1 - decay) * params, so the average forgets at the
rate of 1 - decay per step (it spans about 1 / (1 - decay) steps). It starts from the
model's weights when built, which still weigh decay**t after t steps: a decay suits runs
of many more than 1 / (1 - decay) steps (0.999: several thousand). The average is a
whole second `MLP` (`EMA.model`), evaluated like any model; its buffers (BatchNorm's
running statistics, already averages) are copies of the trained model's, taken at each
update.

Every update reads params and avg and writes avg: for the 3072-1024-1024-10 net, 4.2 M
float32 numbers, a pass as memory-bound as the optimizer's, and as it does, it runs chunk
by chunk in cache (`mlp.elementwise`) and in place. Measured on that net (float32, one
BLAS thread, the 2-core machine): 2.4 ms a step in chunks, 3.3 ms on whole arrays, beside
4.3 ms for the momentum update and 40 ms for the forward and backward pass of a batch of
200, so about 5% of a step; 0.6 ms a step with every=4. With `every` = k > 1 it runs on every
k-th batch of an epoch and on the epoch's last, each time with decay**m for the m steps
since the previous one (the weights in between are taken as equal to the current ones),
so that the average at the end of an epoch, where it is evaluated, is always up to date.
"""

from __future__ import annotations

import functools

import numpy as np

from mlp.core import elementwise
from mlp.core.model import MLP

Array = np.ndarray


def _require(ok: bool, key: str, value: object, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{key}={value!r} is not allowed: expected {allowed}")


class EMA:
    """The moving average of `model`'s weights with `decay` in [0, 1), updated every
    `every` steps (see the module docstring)."""

    def __init__(self, model: MLP, decay: float, every: int = 1) -> None:
        _require(0 <= decay < 1, "trainer.ema", decay, "a decay in [0, 1) (0: no average)")
        _require(isinstance(every, int) and every >= 1, "trainer.ema_every", every,
                 "an integer >= 1")
        self.decay = decay
        self.every = every
        self.model = model.copy()

    def update(self, model: MLP, batch: int, last: bool) -> None:
        """Fold `model`'s weights into the average after the update of batch `batch`
        (0-based within its epoch; `last`: the epoch's last batch), in place: nothing is
        allocated."""
        if (batch + 1) % self.every and not last:
            return
        # A Python float keeps float32 arithmetic in float32 (a NumPy float64 would not).
        mix = functools.partial(_mix, keep=float(self.decay) ** (batch % self.every + 1))
        for name, avg in self.model.params.items():
            elementwise.chunked(mix, avg, model.params[name])
        for name, avg in self.model.buffers.items():
            np.copyto(avg, model.buffers[name])

    def state_dict(self) -> dict[str, Array]:
        """The average's parameters and buffers by name (its own arrays, not copies)."""
        return {**self.model.params, **self.model.buffers}

    def load_state_dict(self, state: dict[str, Array]) -> None:
        """Copy what `state_dict` returned into the average (names and shapes must match)."""
        self.model.set_params({n: state[n] for n in self.model.params},
                              {n: state[n] for n in self.model.buffers})


def _mix(avg: Array, p: Array, *, keep: float, scratch: Array) -> None:
    """avg = keep * avg + (1 - keep) * p on a chunk, in place."""
    avg *= keep
    np.multiply(p, 1 - keep, out=scratch)
    avg += scratch
