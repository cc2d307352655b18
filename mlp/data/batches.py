"""Stage 6, augment and batch: random crops and flips, the epoch's minibatches, and the
moved and mirror images that test-time augmentation averages over
(`data.augment.test_shift`, `.test_flip`)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from numpy.typing import DTypeLike

from mlp.data.cifar import DIM, IMAGE_SIZE
from mlp.data.normalize import Normalizer


def augment(X: np.ndarray, rng: np.random.Generator, pad: int = 4, flip: bool = True) -> np.ndarray:
    """Random crop and horizontal flip: X uint8 (B, 3072) -> new uint8 (B, 3072).

    Each image is zero-padded by `pad` pixels on every side and a 32x32 window taken at a
    random offset (oy, ox) in 0..2*pad, so out[i, j] = image[i + oy - pad, j + ox - pad]
    (the content moves by pad - oy rows and pad - ox columns); pad=0 means no crop. With
    `flip`, each image is then mirrored left-right with probability 1/2. One gather for the
    whole batch; the result depends only on X and the rng state.
    """
    B = len(X)
    images = X.reshape(B, 3, IMAGE_SIZE, IMAGE_SIZE)
    if pad:
        size = IMAGE_SIZE + 2 * pad
        padded = np.zeros((B, 3, size, size), dtype=np.uint8)
        padded[:, :, pad : pad + IMAGE_SIZE, pad : pad + IMAGE_SIZE] = images
        offsets = rng.integers(0, 2 * pad + 1, size=(B, 2))
        # a view of every 32x32 window, (B, 3, 2*pad+1, 2*pad+1, 32, 32): picking one window
        # per image copies 32-byte rows, ten times faster than gathering single pixels
        windows = sliding_window_view(padded, (IMAGE_SIZE, IMAGE_SIZE), axis=(2, 3))
        out = windows[np.arange(B), :, offsets[:, 0], offsets[:, 1]]
    else:
        out = images.copy()
    if flip:
        mirrored = rng.random(B) < 0.5
        out[mirrored] = out[mirrored, :, :, ::-1]
    return out.reshape(B, DIM)


def shift(X: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Every image moved: X (N, 3072) -> a new (N, 3072) array of X's dtype,
    out[i, c, y, x] = X[i, c, y + dy, x + dx], zero where that falls outside the image
    (the crop `augment` takes at offset (pad + dy, pad + dx) of the zero-padded image)."""
    images = X.reshape(len(X), 3, IMAGE_SIZE, IMAGE_SIZE)
    out = np.zeros_like(images)
    rows, cols = _overlap(dy), _overlap(dx)
    out[:, :, rows[0], cols[0]] = images[:, :, rows[1], cols[1]]
    return out.reshape(len(X), DIM)


def _overlap(d: int) -> tuple[slice, slice]:
    """(destination, source) slices of one axis moved by d: out[k] = image[k + d]."""
    if d >= 0:
        return slice(0, max(IMAGE_SIZE - d, 0)), slice(min(d, IMAGE_SIZE), IMAGE_SIZE)
    return slice(min(-d, IMAGE_SIZE), IMAGE_SIZE), slice(0, max(IMAGE_SIZE + d, 0))


def mirror(X: np.ndarray) -> np.ndarray:
    """Every image mirrored left-right: X (N, 3072) -> a new (N, 3072) array of X's dtype,
    out[i, c, y, x] = X[i, c, y, 31 - x] (the flip `augment` draws at random)."""
    images = X.reshape(len(X), 3, IMAGE_SIZE, IMAGE_SIZE)
    return np.ascontiguousarray(images[..., ::-1]).reshape(len(X), DIM)


def batches(
    X: np.ndarray,
    y: np.ndarray,
    order: np.ndarray,
    batch_size: int,
    normalizer: Normalizer,
    dtype: DTypeLike = np.float32,
    *,
    first: int = 0,
    seed: int = 0,
    epoch: int = 0,
    augment_pad: int = 0,
    augment_flip: bool = False,
    prefetch: bool = False,
    out: tuple[np.ndarray, np.ndarray] | None = None,
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """One epoch's minibatches: (b, normalized X (B, F), y (B,)) for b = first, first+1,
    ... over X uint8 (N, 3072), y (N,) in the epoch's `order` (a permutation of N rows);
    F = normalizer.out_dim (3072 unless PCA whitening keeps fewer components).

    Batch b holds rows order[b*batch_size:(b+1)*batch_size] (the last one may be smaller),
    augmented (`augment_pad`, `augment_flip`) with its own generator seeded by
    (seed, 3, epoch, b), so it is the same batch whenever and on whichever thread it is
    prepared, and after a resume at batch `first`. With `prefetch`, batch b+1 is prepared
    on a helper thread while the caller works on batch b (NumPy releases the GIL in the
    copies and ufuncs). With `out`, two float (batch_size, F) arrays, the batches are
    normalized into them in turn: a batch stays valid until the caller asks for the next
    one, and an epoch allocates nothing but whitening's scratch (`Normalizer.__call__`);
    without, every batch is a new array.
    """
    if len(X) != len(y) or sorted(np.shape(order)) != [len(X)]:
        raise ValueError(f"batches: {len(X)} images, {len(y)} labels, an order of shape "
                         f"{np.shape(order)}")
    if batch_size < 1:
        raise ValueError(f"batches: batch_size must be >= 1, got {batch_size}")
    count = -(-len(X) // batch_size)

    def prepare(b: int) -> tuple[int, np.ndarray, np.ndarray]:
        idx = order[b * batch_size:(b + 1) * batch_size]
        Xb = X[idx]
        if augment_pad or augment_flip:
            Xb = augment(Xb, np.random.default_rng([seed, 3, epoch, b]), augment_pad,
                         augment_flip)
        buf = None if out is None else out[b % 2][:len(idx)]
        return b, normalizer(Xb, dtype, out=buf), np.asarray(y[idx])

    if not prefetch:
        yield from map(prepare, range(first, count))
        return
    with ThreadPoolExecutor(1, thread_name_prefix="mlp-batches") as pool:
        pending = pool.submit(prepare, first) if first < count else None
        for b in range(first, count):
            batch = pending.result()
            pending = pool.submit(prepare, b + 1) if b + 1 < count else None
            yield batch
