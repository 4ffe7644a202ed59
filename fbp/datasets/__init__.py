"""Small real data sets shipped with fbp, a train/test split, and an IDX (MNIST format) reader.

Every loader returns ``(X, y)`` as fresh numpy arrays (the parsed file is cached in-process, and
each call returns a copy, so callers may modify what they get):

    load_digits(scale=False)   -> X (1797, 64)  float32 in 0..16 (0..1 if scale), y (1797,) int32 0..9
    load_mnist_5k(scale=False) -> X (5000, 784) float32 in 0..255 (0..1 if scale), y (5000,) int32 0..9
    load_digits(as_images=True)   -> X (1797, 8, 8, 1)    (channels-last images, for Conv2D)
    load_mnist_5k(as_images=True) -> X (5000, 28, 28, 1)
    load_breast_cancer()       -> X (569, 30)   float32 raw features, y (569,) int32 (0 malignant, 1 benign)
    load_diabetes()            -> X (442, 10)   float32 raw features, y (442,) float32 progression target

Images are flattened row-major by default (``X.reshape(-1, 8, 8)`` / ``(-1, 28, 28)`` gives the
pictures); ``as_images=True`` returns them as ``(n, height, width, 1)``, channels last (NHWC).
Features are returned raw, never standardized; use :func:`standardize` with statistics fitted on
the training split only. Sources and licences: ``fbp/datasets/data/README.md``.

This module needs numpy alone; importing it does not import jax.
"""

from __future__ import annotations

import functools
import gzip
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np

__all__ = [
    "load_breast_cancer",
    "load_diabetes",
    "load_digits",
    "load_idx",
    "load_mnist_5k",
    "standardize",
    "train_test_split",
]

_DATA = Path(__file__).resolve().parent / "data"


@functools.cache
def _read(name: str, delimiter: str | None, skiprows: int = 0) -> np.ndarray:
    """Parse one shipped text file into a read-only float64 array (cached; never handed out)."""
    with gzip.open(_DATA / name, "rt") as f:
        table = np.loadtxt(f, delimiter=delimiter, skiprows=skiprows, dtype=np.float64, ndmin=2)
    table.flags.writeable = False
    return table


def _images(
    name: str, side: int, top: float, scale: bool, as_images: bool
) -> tuple[np.ndarray, np.ndarray]:
    table = _read(name, ",")
    X = table[:, : side * side].astype(np.float32)  # (n, side*side), a fresh copy
    y = table[:, side * side].astype(np.int32)  # (n,)
    if scale:
        X /= np.float32(top)
    if as_images:
        X = X.reshape(-1, side, side, 1)  # (n, height, width, channels), row-major pixels
    return X, y


def load_digits(scale: bool = False, as_images: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """UCI optical digits: ``X`` (1797, 64) float32 grey levels 0..16 (divided by 16 if ``scale``),
    or (1797, 8, 8, 1) with ``as_images``; ``y`` (1797,) int32 labels 0..9."""
    return _images("digits.csv.gz", 8, 16.0, scale, as_images)


def load_mnist_5k(scale: bool = False, as_images: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The first 5000 MNIST training images: ``X`` (5000, 784) float32 grey levels 0..255
    (divided by 255 if ``scale``), or (5000, 28, 28, 1) with ``as_images``; ``y`` (5000,) int32
    labels 0..9."""
    return _images("mnist_5k.csv.gz", 28, 255.0, scale, as_images)


def load_breast_cancer() -> tuple[np.ndarray, np.ndarray]:
    """Wisconsin diagnostic breast cancer: ``X`` (569, 30) float32 raw features (scales differ by
    orders of magnitude; standardize them), ``y`` (569,) int32, 0 malignant and 1 benign."""
    table = _read("breast_cancer.csv.gz", ",", skiprows=1)  # header: 569,30,malignant,benign
    return table[:, :30].astype(np.float32), table[:, 30].astype(np.int32)


def load_diabetes() -> tuple[np.ndarray, np.ndarray]:
    """Efron et al. (2004) diabetes: ``X`` (442, 10) float32 raw baseline features (age, sex, bmi,
    bp, s1..s6; unlike scikit-learn's default, not mean-centred or scaled), ``y`` (442,) float32
    disease progression one year later (25..346)."""
    X = _read("diabetes_data_raw.csv.gz", None).astype(np.float32)
    y = _read("diabetes_target.csv.gz", None).astype(np.float32).reshape(-1)
    return X, y


def standardize(X_train, *others) -> tuple[np.ndarray, ...]:
    """Return ``(X_train, *others)`` standardized with the mean and standard deviation of
    ``X_train``'s columns (fit on the training split only, so no test statistics leak in).

    Constant columns (std 0, e.g. the always-blank corner pixels of digits) are only centred.
    Floating inputs keep ``X_train``'s dtype; integer inputs come back as float32.
    """
    X_train = np.asarray(X_train)
    mean = X_train.mean(axis=0, dtype=np.float64)  # (features,)
    std = X_train.std(axis=0, dtype=np.float64)  # (features,)
    std[std == 0] = 1.0
    dtype = X_train.dtype if np.issubdtype(X_train.dtype, np.floating) else np.float32
    return tuple(((np.asarray(X) - mean) / std).astype(dtype) for X in (X_train, *others))


def train_test_split(*arrays, test_size=0.2, seed=0, stratify=None, shuffle=True) -> tuple:
    """Split arrays along their first axis into ``(a_train, a_test, b_train, b_test, ...)``.

    The order of results and the test size follow scikit-learn: a float ``test_size`` in (0, 1)
    gives ``ceil(test_size * n)`` test samples, an int gives exactly that many; the rest train.
    ``seed`` seeds a ``numpy.random.default_rng``, so the same seed gives the same split.
    ``shuffle=False`` takes the last samples, in order, as the test set.

    ``stratify`` (labels, one per sample, e.g. ``y``; rows of a one-hot matrix work too) keeps
    each class's proportion: class ``c`` with ``n_c`` samples gets ``n_test * n_c / n`` test
    samples rounded down, and the leftover test slots go to the classes with the largest
    remainders (ties broken at random), so every class is within one sample of its exact share
    and the total is exactly ``n_test``. Each class needs at least 2 samples.
    """
    if not arrays:
        raise ValueError("train_test_split needs at least one array")
    lengths = [len(a) for a in arrays]
    if len(set(lengths)) != 1:
        raise ValueError(f"train_test_split: all arrays must have the same length, got {lengths}")
    n = lengths[0]
    n_test = _test_count(test_size, n)
    rng = np.random.default_rng(seed)
    if stratify is not None:
        if not shuffle:
            raise ValueError("train_test_split: stratify needs shuffle=True")
        train, test = _stratified(np.asarray(stratify), n, n_test, rng)
    else:
        order = rng.permutation(n) if shuffle else np.arange(n)
        train, test = order[: n - n_test], order[n - n_test :]
    out = []
    for a in arrays:
        a = a if hasattr(a, "shape") else np.asarray(a)
        out += [a[train], a[test]]
    return tuple(out)


def _test_count(test_size, n: int) -> int:
    if isinstance(test_size, (bool, np.bool_)) or not isinstance(
        test_size, (int, float, np.number)
    ):
        raise ValueError(f"test_size must be a float in (0, 1) or an int count, got {test_size!r}")
    if isinstance(test_size, (float, np.floating)):
        if not 0.0 < test_size < 1.0:
            raise ValueError(f"test_size as a fraction must be in (0, 1), got {test_size}")
        n_test = math.ceil(test_size * n)
    else:
        n_test = int(test_size)
    if not 0 < n_test < n:
        raise ValueError(
            f"test_size={test_size!r} gives {n_test} test and {n - n_test} train samples out of "
            f"{n}; both must be at least 1"
        )
    return n_test


def _stratified(y: np.ndarray, n: int, n_test: int, rng) -> tuple[np.ndarray, np.ndarray]:
    if len(y) != n:
        raise ValueError(f"stratify has length {len(y)}, but the arrays have length {n}")
    classes, label, counts = np.unique(
        y, axis=0 if y.ndim > 1 else None, return_inverse=True, return_counts=True
    )
    label = label.reshape(-1)
    if counts.min() < 2:
        raise ValueError(
            f"stratify: class {classes[counts.argmin()]!r} has only 1 sample; each class needs 2"
        )
    share = counts * n_test / n  # exact test samples per class
    k = np.floor(share).astype(int)
    by_remainder = np.lexsort((rng.random(len(k)), -(share - k)))  # largest remainder first
    k[by_remainder[: n_test - k.sum()]] += 1
    train, test = [], []
    for c, k_c in enumerate(k):
        members = rng.permutation(np.flatnonzero(label == c))
        test.append(members[:k_c])
        train.append(members[k_c:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


# IDX: 00 00 <dtype code> <ndim>, then ndim big-endian uint32 sizes, then big-endian data.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def load_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (the MNIST / Fashion-MNIST format), gzipped or not, into a numpy array.

    Gzip is detected by its magic bytes ``1f 8b`` (whatever the file's name). The result has the
    file's shape and dtype (uint8, int8, int16, int32, float32 or float64) in native byte order.
    Raises ValueError for a bad magic number, a truncated file or trailing bytes.
    """
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(f"{path}: corrupt or truncated gzip data ({e})") from e
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] not in _IDX_DTYPES:
        raise ValueError(
            f"{path}: not an IDX file: magic bytes {raw[:4].hex(' ')!r}, expected "
            "'00 00 <dtype> <ndim>' with dtype one of 08 09 0b 0c 0d 0e"
        )
    ndim, dtype = raw[3], np.dtype(_IDX_DTYPES[raw[2]])
    start = 4 + 4 * ndim
    if len(raw) < start:
        raise ValueError(f"{path}: truncated IDX header: {ndim} dims need {start} bytes")
    shape = struct.unpack(f">{ndim}I", raw[4:start])
    size = math.prod(shape)
    want, got = size * dtype.itemsize, len(raw) - start
    if got != want:
        problem = "truncated IDX data" if got < want else "trailing bytes after IDX data"
        raise ValueError(
            f"{path}: {problem}: shape {shape} of {dtype.name} needs {want} bytes, found {got}"
        )
    data = np.frombuffer(raw, dtype=dtype, count=size, offset=start)
    return data.astype(dtype.newbyteorder("=")).reshape(shape)
