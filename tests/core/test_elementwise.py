"""Tests of mlp.elementwise: every element is visited once, in chunks of the right size,
with a scratch of the arrays' dtype; arrays it cannot split without copying are refused."""

from __future__ import annotations

import numpy as np
import pytest

from mlp.core import elementwise


@pytest.mark.parametrize("n", [0, 1, 63, 64, 65, 200])
def test_every_element_once_across_chunk_boundaries(n: int, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(elementwise, "CHUNK", 64)
    a = np.arange(n, dtype=np.float32).reshape(-1, 1) if n else np.zeros((0, 1), np.float32)
    b = np.ones_like(a)
    sizes = []

    def kernel(x, y, scratch):
        assert scratch.shape == x.shape and scratch.dtype == x.dtype
        np.multiply(x, 2, out=scratch)
        y += scratch
        sizes.append(x.size)

    elementwise.chunked(kernel, a, b)
    np.testing.assert_array_equal(b, 1 + 2 * a)
    assert sum(sizes) == n and all(s <= 64 for s in sizes)


def test_rows_gives_several_scratch_arrays(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(elementwise, "CHUNK", 8)
    a = np.arange(20.0)

    def kernel(x, scratch):
        assert scratch.shape == (3, x.size)
        scratch[0] = x
        scratch[2] = scratch[0] * 3
        x[...] = scratch[2]

    elementwise.chunked(kernel, a, rows=3)
    np.testing.assert_array_equal(a, 3 * np.arange(20.0))


def test_refuses_non_contiguous_and_mismatched_arrays():
    a = np.zeros((4, 6))
    with pytest.raises(ValueError, match="C-contiguous"):
        elementwise.chunked(lambda x, scratch: None, a.T)
    with pytest.raises(ValueError, match="sizes"):
        elementwise.chunked(lambda x, y, scratch: None, a, np.zeros(5))
