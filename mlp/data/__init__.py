"""CIFAR-10 for mlp-lab, one module per stage of the way from the archive to a minibatch.

    fetch      the official download (md5-checked, resumed, retried) or a local archive
    extract    safe extraction of the tar archive
    cache      decoding the pickled batches once into memory-mapped uint8 arrays
    splits     a seeded validation set held out of the training images
    normalize  preprocessing fitted on the training split (`Normalizer`), whitening too
    batches    random crop + flip (`augment`), an epoch's minibatches (`batches`) and the
               views test-time augmentation averages over (`shift`, `mirror`)

`cifar` holds what every stage knows (class names, image layout, `DataError`) and
`synthetic` writes a small look-alike archive for tests and quick runs. The names below
are the package's interface; callers import them from `mlp.data`.
"""

from mlp.data.batches import augment, batches, mirror, shift
from mlp.data.cache import Cifar10, load_cifar10
from mlp.data.cifar import CLASSES, DIM, IMAGE_SIZE, DataError
from mlp.data.extract import safe_extract
from mlp.data.fetch import (
    ARCHIVE_NAME,
    OFFICIAL_MD5,
    OFFICIAL_URL,
    default_root,
    download,
    fetch_archive,
    file_digest,
)
from mlp.data.normalize import Normalizer, output_dim
from mlp.data.splits import Splits, split
from mlp.data.synthetic import make_synthetic_archive

__all__ = [
    "ARCHIVE_NAME", "CLASSES", "DIM", "IMAGE_SIZE", "OFFICIAL_MD5", "OFFICIAL_URL", "Cifar10",
    "DataError", "Normalizer", "Splits", "augment", "batches", "default_root", "download",
    "fetch_archive", "file_digest", "load_cifar10", "make_synthetic_archive", "mirror",
    "output_dim", "safe_extract", "shift", "split",
]
