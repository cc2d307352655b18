"""What CIFAR-10 is, for every stage: the class names, the image layout, the archive's
batch files, and `DataError`, the one exception of the data stages.

Images are rows of 3072 uint8 values, as in the archive: the R, G and B planes of a 32x32
image one after the other.
"""

from __future__ import annotations

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

IMAGE_SIZE = 32
DIM = 3 * IMAGE_SIZE * IMAGE_SIZE

BATCH_DIR = "cifar-10-batches-py"  # the archive's one folder
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))


class DataError(ValueError):
    """A data problem the user can fix; the message says which file, what is wrong, what to do."""

