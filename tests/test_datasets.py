"""fbp.datasets: loaders against the data README and the raw files, splits, IDX reading."""

import csv
import gzip
import math
import struct
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import fbp.datasets as ds

DATA = Path(ds.__file__).parent / "data"

# loader, rows, features, largest raw feature value (None: not a fixed range), label classes
LOADERS = [
    (ds.load_digits, 1797, 64, 16.0, 10),
    (ds.load_mnist_5k, 5000, 784, 255.0, 10),
    (ds.load_breast_cancer, 569, 30, None, 2),
]


@pytest.mark.parametrize("load, n, d, top, classes", LOADERS, ids=[c[0].__name__ for c in LOADERS])
def test_classification_loaders_match_readme(load, n, d, top, classes):
    X, y = load()
    assert X.shape == (n, d) and X.dtype == np.float32
    assert y.shape == (n,) and y.dtype == np.int32
    np.testing.assert_array_equal(np.unique(y), np.arange(classes))
    assert np.isfinite(X).all() and X.min() >= 0
    if top is not None:
        assert X.max() == top and np.array_equal(X, np.round(X))  # integer grey levels


def test_breast_cancer_class_counts_and_header():
    # scikit-learn documents 212 malignant (0) and 357 benign (1); the header says the same shape
    _, y = ds.load_breast_cancer()
    np.testing.assert_array_equal(np.bincount(y), [212, 357])
    with gzip.open(DATA / "breast_cancer.csv.gz", "rt") as f:
        assert f.readline().strip() == "569,30,malignant,benign"


def test_diabetes_loader_matches_readme():
    X, y = ds.load_diabetes()
    assert X.shape == (442, 10) and X.dtype == np.float32
    assert y.shape == (442,) and y.dtype == np.float32
    assert y.min() == 25 and y.max() == 346  # the documented target range
    np.testing.assert_array_equal(np.unique(X[:, 1]), [1, 2])  # sex is coded 1/2 in the raw data


def _csv_row(name, index, skip=0):
    with gzip.open(DATA / name, "rt", newline="") as f:
        rows = csv.reader(f)
        for _ in range(skip + index):
            next(rows)
        return [float(v) for v in next(rows)]


@pytest.mark.parametrize(
    "load, name, index, skip",
    [
        (ds.load_digits, "digits.csv.gz", 0, 0),
        (ds.load_digits, "digits.csv.gz", 1796, 0),
        (ds.load_mnist_5k, "mnist_5k.csv.gz", 4321, 0),
        (ds.load_breast_cancer, "breast_cancer.csv.gz", 568, 1),
    ],
)
def test_rows_match_the_raw_file_read_with_csv(load, name, index, skip):
    X, y = load()
    row = _csv_row(name, index, skip)
    np.testing.assert_array_equal(X[index], np.array(row[:-1], dtype=np.float32))
    assert y[index] == int(row[-1])


def test_diabetes_row_matches_the_raw_files():
    X, y = ds.load_diabetes()
    with gzip.open(DATA / "diabetes_data_raw.csv.gz", "rt") as f:
        first = f.readline().split()
    with gzip.open(DATA / "diabetes_target.csv.gz", "rt") as f:
        target = [float(line) for line in f]
    np.testing.assert_array_equal(X[0], np.array(first, dtype=np.float32))
    np.testing.assert_array_equal(y, np.array(target, dtype=np.float32))
    assert X[0, 0] == 59 and y[0] == 151  # as printed in the README's source files


def test_scale_divides_by_the_grey_level_range():
    for load, top in ((ds.load_digits, 16), (ds.load_mnist_5k, 255)):
        (raw, y), (scaled, y2) = load(), load(scale=True)
        assert scaled.dtype == np.float32 and scaled.max() == 1.0 and scaled.min() == 0.0
        np.testing.assert_allclose(scaled, raw / top, rtol=1e-7)
        np.testing.assert_array_equal(y, y2)


def test_loaders_return_fresh_copies():
    X, y = ds.load_digits()
    X[:] = -1
    y[:] = -1
    X2, y2 = ds.load_digits()
    assert X2.min() == 0 and y2.min() == 0 and X2.flags.writeable


def test_module_imports_without_jax():
    path = Path(ds.__file__)
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('fbp_datasets', {str(path)!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "assert m.load_digits()[0].shape == (1797, 64)\n"
        "assert 'jax' not in sys.modules, 'fbp.datasets imported jax'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------ train_test_split


def test_split_sizes_follow_scikit_learn():
    n = 10
    a = np.arange(n)
    train, test = ds.train_test_split(a, test_size=0.25)
    assert (len(train), len(test)) == (7, 3)  # ceil(0.25 * 10) = 3 test samples
    train, test = ds.train_test_split(a, test_size=4)
    assert (len(train), len(test)) == (6, 4)
    train, test = ds.train_test_split(np.arange(1797))  # default 0.2: ceil(359.4) = 360
    assert (len(train), len(test)) == (1437, 360)


def test_split_is_a_disjoint_cover_and_keeps_arrays_aligned():
    n = 53
    X = np.arange(n * 2, dtype=np.float32).reshape(n, 2)  # row i is (2i, 2i+1)
    y = np.arange(n)
    X_tr, X_te, y_tr, y_te, l_tr, l_te = ds.train_test_split(X, y, list(range(n)), seed=3)
    np.testing.assert_array_equal(np.sort(np.concatenate([y_tr, y_te])), np.arange(n))
    np.testing.assert_array_equal(X_tr[:, 0], 2 * y_tr)
    np.testing.assert_array_equal(X_te[:, 0], 2 * y_te)
    np.testing.assert_array_equal(l_tr, y_tr)  # a list is split like an array
    np.testing.assert_array_equal(l_te, y_te)
    assert not np.array_equal(y_tr, np.sort(y_tr))  # shuffled


def test_split_is_reproducible_and_seed_dependent():
    y = np.arange(100)
    a = ds.train_test_split(y, seed=7)
    b = ds.train_test_split(y, seed=7)
    c = ds.train_test_split(y, seed=8)
    assert all(np.array_equal(u, v) for u, v in zip(a, b, strict=True))
    assert not np.array_equal(a[1], c[1])


def test_split_without_shuffle_takes_the_tail():
    train, test = ds.train_test_split(np.arange(10), test_size=3, shuffle=False)
    np.testing.assert_array_equal(train, np.arange(7))
    np.testing.assert_array_equal(test, [7, 8, 9])


def test_split_accepts_jax_arrays():
    x = jnp.arange(20, dtype=jnp.float32)
    train, test = ds.train_test_split(x, test_size=5)
    assert test.shape == (5,) and train.shape == (15,)
    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(20))


@pytest.mark.parametrize(
    "labels, test_size",
    [
        (ds.load_digits()[1], 0.2),
        (np.repeat([0, 1, 2], [50, 30, 7]), 0.3),
        (np.repeat([5, 9, 2, 7], [11, 3, 40, 2]), 13),
    ],
    ids=["digits", "imbalanced", "int-count"],
)
def test_stratified_split_keeps_class_proportions(labels, test_size):
    n = len(labels)
    n_test = test_size if isinstance(test_size, int) else math.ceil(test_size * n)
    idx_tr, idx_te, y_tr, y_te = ds.train_test_split(
        np.arange(n), labels, test_size=test_size, stratify=labels, seed=1
    )
    assert len(y_te) == n_test and len(y_tr) == n - n_test
    np.testing.assert_array_equal(np.sort(np.concatenate([idx_tr, idx_te])), np.arange(n))
    for c in np.unique(labels):
        exact = np.sum(labels == c) * n_test / n
        assert abs(np.sum(y_te == c) - exact) < 1, (c, np.sum(y_te == c), exact)
        assert np.sum(y_te == c) + np.sum(y_tr == c) == np.sum(labels == c)
    np.testing.assert_array_equal(labels[idx_te], y_te)


def test_stratify_accepts_one_hot_rows():
    labels = np.repeat([0, 1], [30, 10])
    onehot = np.eye(2, dtype=np.float32)[labels]
    _, y_te = ds.train_test_split(labels, test_size=0.25, stratify=onehot)
    np.testing.assert_array_equal(np.bincount(y_te), [8, 2])  # 10 test: 7.5 -> 8 and 2.5 -> 2


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((np.zeros(10), np.zeros(9)), {}, r"\[10, 9\]"),
        ((np.zeros(10),), {"test_size": 0.0}, "in \\(0, 1\\)"),
        ((np.zeros(10),), {"test_size": 1.0}, "in \\(0, 1\\)"),
        ((np.zeros(10),), {"test_size": 10}, "both must be at least 1"),
        ((np.zeros(10),), {"test_size": 0}, "both must be at least 1"),
        ((np.zeros(10),), {"test_size": True}, "float in \\(0, 1\\) or an int"),
        ((np.zeros(10),), {"test_size": "0.2"}, "float in \\(0, 1\\) or an int"),
        ((np.zeros(4),), {"stratify": [0, 0, 0, 1]}, "only 1 sample"),
        ((np.zeros(4),), {"stratify": [0, 0, 1, 1], "shuffle": False}, "shuffle=True"),
        ((np.zeros(4),), {"stratify": [0, 1, 1]}, "length 3"),
        ((), {}, "at least one array"),
    ],
)
def test_split_rejects_bad_calls(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ds.train_test_split(*args, **kwargs)


# ------------------------------------------------------------------------------------ standardize


def test_standardize_uses_training_statistics_only():
    rng = np.random.default_rng(0)
    X_tr = rng.normal(3.0, 2.0, size=(50, 3)).astype(np.float32)
    X_tr[:, 2] = 7.0  # a constant column
    X_te = rng.normal(size=(10, 3)).astype(np.float32)
    Z_tr, Z_te = ds.standardize(X_tr, X_te)
    mean = X_tr.astype(np.float64).mean(0)
    std = X_tr.astype(np.float64).std(0)
    assert Z_tr.dtype == Z_te.dtype == np.float32
    np.testing.assert_allclose(Z_te[:, :2], (X_te[:, :2] - mean[:2]) / std[:2], rtol=1e-5)
    np.testing.assert_allclose(Z_tr[:, :2].mean(0), 0, atol=1e-6)
    np.testing.assert_allclose(Z_tr[:, :2].std(0), 1, rtol=1e-5)
    np.testing.assert_array_equal(Z_tr[:, 2], 0)  # constant column: centred, not divided by 0
    np.testing.assert_allclose(Z_te[:, 2], X_te[:, 2] - 7.0, rtol=1e-6)


# --------------------------------------------------------------------------------------- load_idx

IDX_CODES = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C}
IDX_CODES.update({np.float32: 0x0D, np.float64: 0x0E})


def _idx_bytes(a: np.ndarray) -> bytes:
    """IDX written independently: struct for the header, an explicit '>' dtype for the data."""
    header = struct.pack(">BBBB", 0, 0, IDX_CODES[a.dtype.type], a.ndim)
    header += struct.pack(f">{a.ndim}I", *a.shape)
    return header + a.astype(a.dtype.newbyteorder(">")).tobytes()


IDX_CASES = [
    np.arange(5 * 4 * 3, dtype=np.uint8).reshape(5, 4, 3) * 4,  # images
    np.array([5, 0, 4, 1, 9, 2, 1], dtype=np.uint8),  # labels
    np.array([-128, -1, 0, 127], dtype=np.int8),
    np.array([[-30000, 2], [3, 30000]], dtype=np.int16),
    np.array([[-(2**31), 1, 2**31 - 1]], dtype=np.int32),
    np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4),
    np.array([np.pi, -np.e, 1e300], dtype=np.float64),
]


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gzip"])
@pytest.mark.parametrize("a", IDX_CASES, ids=lambda a: f"{a.dtype}-{a.ndim}d")
def test_load_idx_round_trips(tmp_path, a, gz):
    data = _idx_bytes(a)
    path = tmp_path / ("x.idx.gz" if gz else "x.idx")
    path.write_bytes(gzip.compress(data) if gz else data)
    out = ds.load_idx(path)
    assert out.shape == a.shape and out.dtype == a.dtype and out.dtype.isnative
    np.testing.assert_array_equal(out, a)


def test_load_idx_detects_gzip_by_content_not_name(tmp_path):
    a = np.arange(6, dtype=np.uint8).reshape(2, 3)
    (tmp_path / "images-idx3-ubyte").write_bytes(gzip.compress(_idx_bytes(a)))
    np.testing.assert_array_equal(ds.load_idx(tmp_path / "images-idx3-ubyte"), a)


def test_load_idx_reads_the_classic_mnist_header(tmp_path):
    # MNIST's train-labels file starts 00 00 08 01 00 00 ea 60 (magic 2049, 60000 items)
    raw = bytes.fromhex("00000801 00000003") + bytes([7, 2, 1])
    (tmp_path / "labels").write_bytes(raw)
    np.testing.assert_array_equal(ds.load_idx(tmp_path / "labels"), [7, 2, 1])


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda b: b"\x01" + b[1:], "not an IDX file"),
        (lambda b: b[:2] + b"\x0a" + b[3:], "not an IDX file"),
        (lambda b: b[:2], "not an IDX file"),
        (lambda b: b[:9], "truncated IDX header"),
        (lambda b: b[:-1], "truncated IDX data"),
        (lambda b: b + b"\x00", "trailing bytes"),
        (lambda b: gzip.compress(b)[:-12], "gzip"),
    ],
    ids=["magic", "dtype-code", "short", "header", "data", "trailing", "gzip"],
)
def test_load_idx_errors(tmp_path, mutate, match):
    good = _idx_bytes(np.zeros((2, 3, 4), dtype=np.uint8))
    (tmp_path / "bad").write_bytes(mutate(good))
    with pytest.raises(ValueError, match=match):
        ds.load_idx(tmp_path / "bad")


def test_idx_bytes_helper_is_big_endian():
    # guard the reference writer itself: 258 as big-endian int16 is 01 02
    assert _idx_bytes(np.array([258], dtype=np.int16))[-2:] == b"\x01\x02"
    assert _idx_bytes(np.zeros(3, np.uint8))[:8] == bytes.fromhex("00000801 00000003")
