"""fbp.io: bit-exact round trips, ``like`` checking, refusal of pickles, atomic saves."""

import os
import pickle
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fbp import io as fio


class AdamState(NamedTuple):
    """Shaped like an optimizer state: an int32 step count and two trees like the params."""

    count: jax.Array
    mu: dict
    nu: dict


def _bits(x) -> bytes:
    return np.asarray(x).tobytes()


def _all_dtypes() -> dict:
    rng = np.random.default_rng(0)
    f = rng.normal(size=(3, 4))
    f[0, :3] = [np.nan, -np.inf, -0.0]  # special values must survive bit for bit
    c = f.astype(np.complex64)
    c.imag = f[:, ::-1]
    return {
        "f32": f.astype(np.float32),
        "f64": f,
        "f16": f.astype(np.float16),
        "bf16_np": f.astype(jnp.bfloat16),
        "bf16_jax": jnp.asarray(f, dtype=jnp.bfloat16),
        "i32": rng.integers(-(2**31), 2**31 - 1, size=5, dtype=np.int32),
        "i64": np.array([-(2**63), 2**63 - 1], dtype=np.int64),
        "u8": rng.integers(0, 256, size=(2, 2, 2), dtype=np.uint8),
        "i8": np.array([-128, 127], dtype=np.int8),
        "bool": np.array([True, False, True]),
        "c64": c,
        "scalar_f32": np.array(1.5, dtype=np.float32),  # 0-d array
        "scalar_jax": jnp.array(7, dtype=jnp.int32),
        "empty": np.zeros((0, 3), dtype=np.float32),
        "f32_jax": jnp.asarray(f, dtype=jnp.float32),
    }


def _params() -> list:
    k = jax.random.split(jax.random.key(0), 2)
    return [
        {"w": jax.random.normal(k[0], (4, 3), jnp.float32), "b": jnp.zeros(3, jnp.float32)},
        {},
        {"w": jax.random.normal(k[1], (3, 2), jnp.float32), "b": jnp.ones(2, jnp.float32)},
    ]


def _state() -> AdamState:
    params = _params()
    sq = jax.tree.map(lambda p: p * p, params)
    return AdamState(count=jnp.array(12, dtype=jnp.int32), mu={"layers": params}, nu={"layers": sq})


TREES = {
    "all_dtypes": _all_dtypes,
    "params_and_state": lambda: {"params": _params(), "opt_state": (_state(), None)},
    "python_and_numpy_scalars": lambda: {"step": 3, "lr": 0.1, "flag": True, "n": np.float32(2.5)},
    "nested_tuples_lists": lambda: ((np.arange(3), [None, (np.ones(2, np.uint8),)]), [], ()),
    "bare_leaf": lambda: np.arange(6, dtype=np.int32).reshape(2, 3),
}


def _assert_same_tree(got, want, path="tree"):
    """Same containers (types, keys in order, NamedTuple name and fields) and bit-equal leaves."""
    if want is None or isinstance(want, (dict, list, tuple)):
        if hasattr(type(want), "_fields"):
            assert type(got).__name__ == type(want).__name__, path
            assert got._fields == want._fields, path
        else:
            assert type(got) is type(want), path
        if isinstance(want, dict):
            assert list(got) == list(want), path
            for k in want:
                _assert_same_tree(got[k], want[k], f"{path}[{k!r}]")
        elif want is not None:
            assert len(got) == len(want), path
            for i, (g, w) in enumerate(zip(got, want)):
                _assert_same_tree(g, w, f"{path}[{i}]")
        return
    if isinstance(want, (bool, int, float)):
        assert type(got) is type(want) and got == want, path
        return
    assert np.asarray(got).dtype == np.asarray(want).dtype, path
    assert np.shape(got) == np.shape(want), path
    assert _bits(got) == _bits(want), path


@pytest.mark.parametrize("name", TREES)
def test_round_trip_without_like_is_bit_exact(tmp_path, name):
    tree = TREES[name]()
    fio.save(tmp_path / "ckpt.npz", tree)
    loaded = fio.load(tmp_path / "ckpt.npz")
    _assert_same_tree(loaded, tree)
    for leaf in jax.tree.leaves(loaded):  # jax arrays come back as numpy without ``like``
        assert isinstance(leaf, (np.ndarray, np.generic, bool, int, float))


@pytest.mark.parametrize("name", TREES)
def test_round_trip_with_like_rebuilds_like_exactly(tmp_path, name):
    tree = TREES[name]()
    fio.save(tmp_path / "ckpt", tree)
    loaded = fio.load(tmp_path / "ckpt", like=tree)
    assert jax.tree.structure(loaded) == jax.tree.structure(tree)  # same NamedTuple classes too
    for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(tree)):
        assert type(got) is type(want) or (
            isinstance(got, jax.Array) and isinstance(want, jax.Array)
        )
        assert np.asarray(got).dtype == np.asarray(want).dtype
        assert _bits(got) == _bits(want)


def test_like_may_be_shape_dtype_structs(tmp_path):
    tree = {"params": _params(), "opt_state": _state()}
    fio.save(tmp_path / "ckpt", tree)
    like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
    loaded = fio.load(tmp_path / "ckpt", like=like)
    assert jax.tree.structure(loaded) == jax.tree.structure(tree)
    for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(tree)):
        assert isinstance(got, jax.Array) and got.dtype == want.dtype
        assert _bits(got) == _bits(want)


def test_namedtuples_without_like_keep_name_fields_and_a_stable_class(tmp_path):
    fio.save(tmp_path / "ckpt", _state())
    a, b = fio.load(tmp_path / "ckpt"), fio.load(tmp_path / "ckpt")
    assert type(a).__name__ == "AdamState" and a._fields == ("count", "mu", "nu")
    assert a.count.dtype == np.int32 and a.count == 12
    assert jax.tree.structure(a) == jax.tree.structure(b)  # a jitted step would not recompile


def test_file_is_written_exactly_at_path_and_readable_by_numpy(tmp_path):
    fio.save(tmp_path / "ckpt", {"w": np.arange(3.0)})
    assert os.listdir(tmp_path) == ["ckpt"]  # no ".npz" appended, no temporary left
    with np.load(tmp_path / "ckpt", allow_pickle=False) as z:
        np.testing.assert_array_equal(z["leaf_0"], np.arange(3.0))


def test_bfloat16_is_stored_as_its_raw_bits(tmp_path):
    x = jnp.array([1.0, -2.5, 3.0e38], dtype=jnp.bfloat16)
    fio.save(tmp_path / "ckpt", {"x": x})
    with np.load(tmp_path / "ckpt", allow_pickle=False) as z:
        assert z["leaf_0"].dtype == np.uint16
        np.testing.assert_array_equal(z["leaf_0"], np.asarray(x).view(np.uint16))


def test_save_overwrites_an_existing_checkpoint(tmp_path):
    fio.save(tmp_path / "ckpt", {"w": np.zeros(2)})
    fio.save(tmp_path / "ckpt", {"w": np.ones(3)})
    np.testing.assert_array_equal(fio.load(tmp_path / "ckpt")["w"], np.ones(3))


# ------------------------------------------------------------------------------ like mismatches


def _replace_w(shape=(4, 3), dtype=jnp.float32):
    def mutate(t):
        t["params"][0]["w"] = jnp.zeros(shape, dtype)
        return t

    return mutate


def _set(path_fn):
    def mutate(t):
        path_fn(t)
        return t

    return mutate


class _Other(NamedTuple):
    """Same fields as AdamState, a different type."""

    count: jax.Array
    mu: dict
    nu: dict


MISMATCHES = [  # (change to ``like``, path named in the error, text naming both sides)
    (_replace_w(shape=(4, 4)), "like['params'][0]['w']", ["shape (4, 4)", "shape (4, 3)"]),
    (_replace_w(dtype=jnp.float64), "like['params'][0]['w']", ["float64", "float32"]),
    (_replace_w(dtype=jnp.bfloat16), "like['params'][0]['w']", ["bfloat16", "float32"]),
    (_set(lambda t: t["params"][2].pop("b")), "like['params'][2]", ["keys ['w']", "'b', 'w'"]),
    (_set(lambda t: t["params"].pop()), "like['params']", ["list of length 2", "length 3"]),
    (_set(lambda t: t.update(params=tuple(t["params"]))), "like['params']", ["tuple", "list"]),
    (_set(lambda t: t["params"].__setitem__(1, None)), "like['params'][1]", ["None", "dict"]),
    (
        _set(lambda t: t.update(opt_state=tuple(t["opt_state"]))),
        "like['opt_state']",
        ["tuple of length 3", "NamedTuple AdamState(count, mu, nu)"],
    ),
    (
        _set(lambda t: t.update(opt_state=_Other(*t["opt_state"]))),
        "like['opt_state']",
        ["_Other(count, mu, nu)", "AdamState(count, mu, nu)"],
    ),
    (
        _set(lambda t: t.update(opt_state=t["opt_state"]._replace(count=jnp.int64(12)))),
        "like['opt_state'].count",
        ["int64", "int32"],
    ),
]


MISMATCH_IDS = ["shape", "dtype", "bf16", "key", "length", "tuple", "none", "nt-vs-tuple"]
MISMATCH_IDS += ["nt-type", "nt-leaf"]


@pytest.mark.parametrize("mutate, path, sides", MISMATCHES, ids=MISMATCH_IDS)
def test_like_mismatch_names_the_first_differing_path(tmp_path, mutate, path, sides):
    fio.save(tmp_path / "ckpt", {"params": _params(), "opt_state": _state()})
    like = mutate({"params": _params(), "opt_state": _state()})
    with pytest.raises(ValueError) as err:
        fio.load(tmp_path / "ckpt", like=like)
    message = str(err.value)
    assert f"{path} does not match" in message
    for side in sides:
        assert side in message


def test_like_with_missing_top_level_key(tmp_path):
    fio.save(tmp_path / "ckpt", {"params": _params(), "step": 3})
    with pytest.raises(ValueError, match=r"like does not match: .*keys \['params'\]"):
        fio.load(tmp_path / "ckpt", like={"params": _params()})


# ------------------------------------------------------------------------- refusing pickled data

EXECUTED = []


def _record(tag):
    EXECUTED.append(tag)
    return tag


class _Payload:
    """Unpickling this calls ``_record``: proof that code ran during a load."""

    def __reduce__(self):
        return (_record, ("code ran while loading",))


def test_object_arrays_are_refused_without_unpickling(tmp_path):
    fio.save(tmp_path / "good", {"w": np.zeros(2)})
    with np.load(tmp_path / "good") as z:
        entries = dict(z)
    entries["leaf_0"] = np.array([_Payload(), None], dtype=object)
    with open(tmp_path / "evil", "wb") as f:
        np.savez(f, **entries)  # allow_pickle is np.savez's default
    assert pickle.loads(pickle.dumps(_Payload())) == "code ran while loading"  # the trap works
    EXECUTED.clear()
    with pytest.raises(ValueError, match="refuses object"):
        fio.load(tmp_path / "evil")
    with pytest.raises(ValueError, match="refuses object"):
        fio.load(tmp_path / "evil", like={"w": np.zeros(2)})
    assert EXECUTED == []


def test_object_tree_entry_and_raw_pickles_are_refused(tmp_path):
    with open(tmp_path / "evil_tree", "wb") as f:
        np.savez(f, __tree__=np.array([_Payload()], dtype=object))
    with open(tmp_path / "evil_pickle", "wb") as f:
        pickle.dump(_Payload(), f)
    EXECUTED.clear()
    with pytest.raises(ValueError, match="unreadable __tree__"):
        fio.load(tmp_path / "evil_tree")
    with pytest.raises(ValueError, match="not an fbp checkpoint"):
        fio.load(tmp_path / "evil_pickle")
    assert EXECUTED == []


@pytest.mark.parametrize(
    "write, match",
    [
        (lambda f: np.savez(f, w=np.zeros(2)), "no valid __tree__"),
        (lambda f: np.save(f, np.zeros(2)), "single .npy array"),
        (lambda f: np.savez(f, __tree__=np.frombuffer(b"{not json", np.uint8)), "unreadable"),
    ],
    ids=["plain-npz", "npy", "bad-json"],
)
def test_files_that_are_not_checkpoints_are_refused(tmp_path, write, match):
    with open(tmp_path / "f", "wb") as f:
        write(f)
    with pytest.raises(ValueError, match=match):
        fio.load(tmp_path / "f")


@pytest.mark.parametrize(
    "tree, match",
    [
        ({"a": ["text"]}, r"tree\['a'\]\[0\] is a str"),
        ({1: np.zeros(2)}, "dict keys must be str"),
        ({"a": np.array(["x"])}, r"tree\['a'\] has dtype <U1"),
    ],
)
def test_save_rejects_what_it_cannot_store(tmp_path, tree, match):
    with pytest.raises(TypeError, match=match):
        fio.save(tmp_path / "ckpt", tree)
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------- atomicity


def _half_written_then_fail(f, **entries):
    f.write(b"PK\x03\x04 partial zip data")
    raise OSError("disk full")


@pytest.mark.parametrize("failure", ["writer", "replace", "interrupt"])
def test_failed_save_leaves_the_old_checkpoint_and_no_temporary(tmp_path, monkeypatch, failure):
    old = {"w": np.arange(4.0)}
    fio.save(tmp_path / "ckpt", old)
    before = (tmp_path / "ckpt").read_bytes()
    if failure == "writer":
        monkeypatch.setattr(fio.np, "savez", _half_written_then_fail)
        expected = OSError
    elif failure == "replace":
        monkeypatch.setattr(fio.os, "replace", lambda *a: (_ for _ in ()).throw(OSError("boom")))
        expected = OSError
    else:
        monkeypatch.setattr(fio.os, "fsync", lambda fd: (_ for _ in ()).throw(KeyboardInterrupt))
        expected = KeyboardInterrupt
    with pytest.raises(expected):
        fio.save(tmp_path / "ckpt", {"w": np.zeros(100)})
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["ckpt"]
    assert (tmp_path / "ckpt").read_bytes() == before
    np.testing.assert_array_equal(fio.load(tmp_path / "ckpt")["w"], old["w"])
