"""One BLAS call NumPy does not expose: a matrix product accumulated into an existing array.

`gemm_tn(a, b, c, alpha, beta)` computes c = alpha * a^T @ b + beta * c in place, the
GEMM's own contract. The training step uses it to add a layer's weight gradient x^T dout
straight into the optimizer's velocity (`optim.Momentum.sinks`): the GEMM reads and
writes c while its tiles are in cache, so the gradient array is never written to memory
and read back, and the update that follows makes one pass instead of several.

The call goes to the BLAS NumPy itself is linked with (its bundled OpenBLAS, found among
the libraries this process has loaded), never to a second copy: SciPy's wheels bring
their own OpenBLAS, and two OpenBLAS thread pools in one step spin against each other
(measured here: a forward and a weight-gradient GEMM of the 3072x1024 layer took 39 ms
with one from each library, 14 ms from NumPy's alone). Where that BLAS or its symbol is
not found (another platform or build), `gemm_tn` computes the same with NumPy: correct,
without the saving.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from pathlib import Path

import numpy as np

Array = np.ndarray

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112
# Names of NumPy's bundled OpenBLAS ({} the routine, e.g. "sgemm"), 64-bit integer
# (ILP64) builds first, with the C type of their integer arguments.
_SYMBOLS = (("scipy_cblas_{}64_", ctypes.c_int64), ("cblas_{}64_", ctypes.c_int64),
            ("scipy_cblas_{}", ctypes.c_int), ("cblas_{}", ctypes.c_int))
_PREFIX = {np.dtype(np.float32): ("s", ctypes.c_float),
           np.dtype(np.float64): ("d", ctypes.c_double)}


def _numpy_blas() -> ctypes.CDLL | None:
    """The OpenBLAS library NumPy loaded (from its own wheel's directory), or None."""
    libs = Path(np.__file__).resolve().parent.parent / "numpy.libs"
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for line in maps.splitlines():
        path = line.split()[-1]
        if "openblas" in path and Path(path).parent == libs:
            return ctypes.CDLL(path)
    return None


_LIB = _numpy_blas()


def _routines(name: str, argtypes: Callable[[type, type], list[type]]
              ) -> dict[np.dtype, Callable[..., None]]:
    """{dtype: the CBLAS routine `name` of that dtype (s/d prefix)} found in NumPy's BLAS;
    argtypes(integer type, real type) gives its argument types."""
    found: dict[np.dtype, Callable[..., None]] = {}
    for dtype, (letter, real) in _PREFIX.items():
        for pattern, integer in _SYMBOLS:
            fn = getattr(_LIB, pattern.format(letter + name), None) if _LIB else None
            if fn is not None:
                fn.restype, fn.argtypes = None, argtypes(integer, real)
                found[dtype] = fn
                break
    return found


_GEMMS = _routines("gemm", lambda i, r: [ctypes.c_int, ctypes.c_int, ctypes.c_int, i, i, i, r,
                                         ctypes.c_void_p, i, ctypes.c_void_p, i, r,
                                         ctypes.c_void_p, i])
_AXPYS = _routines("axpy", lambda i, r: [i, r, ctypes.c_void_p, i, ctypes.c_void_p, i])


def available(dtype: np.dtype | type) -> bool:
    """Whether `gemm_tn` runs as one BLAS call for this dtype (else with NumPy)."""
    return np.dtype(dtype) in _GEMMS


def _rows(m: Array) -> int | None:
    """The leading dimension of a 2-d array whose rows are contiguous, else None."""
    item = m.itemsize
    if m.ndim != 2 or m.strides[1] != item or m.strides[0] % item:
        return None
    return max(m.strides[0] // item, m.shape[1], 1)


def gemm_tn(a: Array, b: Array, c: Array, alpha: float, beta: float) -> Array:
    """c = alpha * a^T @ b + beta * c in place, for a (N, D), b (N, H), c (D, H); returns c.

    c must be C-contiguous and of a's and b's dtype (the caller's state array). With
    beta == 0, c's old values are not read (NaN in c does not leak into the result)."""
    n, d = a.shape
    if b.shape[0] != n or c.shape != (d, b.shape[1]):
        raise ValueError(f"gemm_tn: a {a.shape}, b {b.shape}, c {c.shape}: expected a (N, D), "
                         f"b (N, H), c (D, H)")
    if not c.flags.c_contiguous:
        raise ValueError("gemm_tn: c must be C-contiguous (it is written in place)")
    gemm = _GEMMS.get(c.dtype)
    lda, ldb = _rows(a), _rows(b)
    if gemm is None or a.dtype != c.dtype or b.dtype != c.dtype or lda is None or ldb is None:
        product = np.matmul(a.T, b)
        if beta == 0:
            np.multiply(product, alpha, out=c, casting="same_kind")
        else:
            c *= beta
            product *= alpha
            c += product
        return c
    h = b.shape[1]
    gemm(_ROW_MAJOR, _TRANS, _NO_TRANS, d, h, n, alpha, a.ctypes.data, lda, b.ctypes.data,
         ldb, beta, c.ctypes.data, max(h, 1))
    return c


def axpy(alpha: float, x: Array, y: Array) -> Array:
    """y += alpha * x in place, for C-contiguous x and y of one shape and dtype; returns y.

    One BLAS call over the whole arrays: NumPy's BLAS splits a long one between its
    threads, which a memory-bound pass over weight-sized arrays needs (measured here on
    the 4.2 M weights of the 1024-1024 net: the two passes of the momentum update took
    1.9 ms with a dot product as BLAS calls, 2.9 ms as NumPy operations on cached chunks)."""
    if x.shape != y.shape or not (x.flags.c_contiguous and y.flags.c_contiguous):
        raise ValueError(f"axpy: x {x.shape} and y {y.shape} must be C-contiguous, one shape")
    fn = _AXPYS.get(y.dtype)
    if fn is None or x.dtype != y.dtype:
        y += alpha * x
        return y
    fn(y.size, alpha, x.ctypes.data, 1, y.ctypes.data, 1)
    return y


def set_threads(n: int) -> bool:
    """Set the number of threads of NumPy's BLAS for this process (what
    OPENBLAS_NUM_THREADS sets at start); False when its library was not found."""
    for name in ("scipy_openblas_set_num_threads64_", "openblas_set_num_threads64_",
                 "scipy_openblas_set_num_threads", "openblas_set_num_threads"):
        fn = getattr(_LIB, name, None) if _LIB is not None else None
        if fn is not None:
            fn.argtypes, fn.restype = [ctypes.c_int], None
            fn(int(n))
            return True
    return False
