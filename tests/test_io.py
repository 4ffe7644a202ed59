"""fbp.io: bit-exact round trips, ``like`` checking, the v2 format (and v1 files), refusal of
pickles and of damaged or crafted files (a table and fuzzing), atomic saves under SIGKILL and
SIGTERM (subprocesses), stale temporary files."""

import contextlib
import io as stdio
import json
import os
import pickle
import re
import select
import signal
import subprocess
import sys
import threading
import time
import tracemalloc
import zipfile
from datetime import timedelta
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

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
        "f8": f.astype(jnp.float8_e4m3fn),
        "i4": np.array([-8, 7, 0], dtype=jnp.int4),
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
        "fortran": np.asfortranarray(f),  # stored with fortran_order=True
        "strided": f[:, ::2],
        "big_endian": f.astype(">f8"),  # comes back native
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


AWKWARD_KEYS = {  # dict key -> its entry name in the file
    "params": "params/0/w",
    "a/b": "a%2Fb",
    "": "%",
    ".": "%2E",
    "..": "%2E%2E",
    "__tree__": "%5F_tree__",
    "ü": "%C3%BC",
    "%": "%25",
    "x y": "x%20y",
    "file": "file",  # np.savez(file, **entries) would clash with its own arguments
    "allow_pickle": "allow_pickle",
    "inner": "inner/__tree__",  # only a top-level __tree__ is renamed
}


def _awkward() -> dict:
    tree = {k: np.arange(i, dtype=np.int16) for i, k in enumerate(AWKWARD_KEYS)}
    tree["params"] = [{"w": np.ones(2)}]
    tree["inner"] = {"__tree__": np.zeros(1)}
    return tree


TREES = {
    "all_dtypes": _all_dtypes,
    "params_and_state": lambda: {"params": _params(), "opt_state": (_state(), None)},
    "python_and_numpy_scalars": lambda: {"step": 3, "lr": 0.1, "flag": True, "n": np.float32(2.5)},
    "nested_tuples_lists": lambda: ((np.arange(3), [None, (np.ones(2, np.uint8),)]), [], ()),
    "bare_leaf": lambda: np.arange(6, dtype=np.int32).reshape(2, 3),
    "awkward_keys": _awkward,
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
            for i, (g, w) in enumerate(zip(got, want, strict=True)):
                _assert_same_tree(g, w, f"{path}[{i}]")
        return
    if isinstance(want, (bool, int, float)):
        assert type(got) is type(want) and got == want, path
        return
    want_dtype = np.asarray(want).dtype
    assert np.asarray(got).dtype == want_dtype.newbyteorder("="), path
    assert np.shape(got) == np.shape(want), path
    assert _bits(got) == _bits(np.asarray(want).astype(want_dtype.newbyteorder("="))), path


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
    for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(tree), strict=True):
        assert type(got) is type(want) or (
            isinstance(got, jax.Array) and isinstance(want, jax.Array)
        )
        want = np.asarray(want)
        assert np.asarray(got).dtype == want.dtype.newbyteorder("=")
        assert _bits(got) == _bits(want.astype(want.dtype.newbyteorder("=")))


def test_like_may_be_shape_dtype_structs(tmp_path):
    tree = {"params": _params(), "opt_state": _state()}
    fio.save(tmp_path / "ckpt", tree)
    like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
    loaded = fio.load(tmp_path / "ckpt", like=like)
    assert jax.tree.structure(loaded) == jax.tree.structure(tree)
    for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(tree), strict=True):
        assert isinstance(got, jax.Array) and got.dtype == want.dtype
        assert _bits(got) == _bits(want)


def test_like_places_leaves_with_its_sharding(tmp_path):
    device = jax.devices()[0]
    sharding = jax.sharding.SingleDeviceSharding(device)
    fio.save(tmp_path / "ckpt", {"w": np.arange(4.0)})
    like = {"w": jax.ShapeDtypeStruct((4,), jnp.float64, sharding=sharding)}
    loaded = fio.load(tmp_path / "ckpt", like=like)
    assert loaded["w"].sharding == sharding


def test_namedtuples_without_like_keep_name_fields_and_a_stable_class(tmp_path):
    fio.save(tmp_path / "ckpt", _state())
    a, b = fio.load(tmp_path / "ckpt"), fio.load(tmp_path / "ckpt")
    assert type(a).__name__ == "AdamState" and a._fields == ("count", "mu", "nu")
    assert a.count.dtype == np.int32 and a.count == 12
    assert jax.tree.structure(a) == jax.tree.structure(b)  # a jitted step would not recompile


def test_save_overwrites_an_existing_checkpoint(tmp_path):
    fio.save(tmp_path / "ckpt", {"w": np.zeros(2)})
    fio.save(tmp_path / "ckpt", {"w": np.ones(3)})
    np.testing.assert_array_equal(fio.load(tmp_path / "ckpt")["w"], np.ones(3))


def test_equal_trees_give_identical_files(tmp_path):
    fio.save(tmp_path / "a", _awkward())
    fio.save(tmp_path / "b", _awkward())
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes()
    with zipfile.ZipFile(tmp_path / "a") as z:  # no timestamps (saves 2 s apart would differ)
        assert {info.date_time for info in z.infolist()} == {(1980, 1, 1, 0, 0, 0)}


# ---------------------------------------------------------------------- the format, numpy alone


def test_file_is_written_exactly_at_path_and_readable_by_numpy(tmp_path):
    fio.save(tmp_path / "ckpt", {"params": [{"w": np.arange(3.0)}]})
    assert os.listdir(tmp_path) == ["ckpt"]  # no ".npz" appended, no temporary left
    with np.load(tmp_path / "ckpt", allow_pickle=False) as z:
        np.testing.assert_array_equal(z["params/0/w"], np.arange(3.0))
        header = json.loads(bytes(z["__tree__"]))
    assert header["format"] == "fbp.io" and header["version"] == 2
    leaf = header["tree"]["children"][0]["children"][0]["children"][0]
    assert leaf == {"kind": "leaf", "entry": "params/0/w", "dtype": "float64", "shape": [3]} | {
        "as": "array"
    }


def test_entries_are_named_by_leaf_path(tmp_path):
    fio.save(tmp_path / "ckpt", {"tree": _awkward(), "state": _state()})
    with np.load(tmp_path / "ckpt", allow_pickle=False) as z:
        names = set(z.files)
    nested = {k: v.replace("%5F_tree__", "__tree__") for k, v in AWKWARD_KEYS.items()}
    expected = {f"tree/{name}" for name in nested.values()}  # only a top-level __tree__ moves
    expected |= {"state/count", "__tree__"}
    expected |= {f"state/{m}/layers/{i}/{p}" for m in ("mu", "nu") for i in (0, 2) for p in "wb"}
    assert names == expected
    fio.save(tmp_path / "awkward", _awkward())  # at the top level
    with np.load(tmp_path / "awkward", allow_pickle=False) as z:
        assert set(z.files) == {*AWKWARD_KEYS.values(), "__tree__"}
        np.testing.assert_array_equal(z["%5F_tree__"], _awkward()["__tree__"])
    fio.save(tmp_path / "leaf", np.arange(3))
    with np.load(tmp_path / "leaf", allow_pickle=False) as z:
        assert set(z.files) == {"__root__", "__tree__"}


def test_bfloat16_is_stored_as_its_raw_bits(tmp_path):
    x = jnp.array([1.0, -2.5, 3.0e38], dtype=jnp.bfloat16)
    fio.save(tmp_path / "ckpt", {"x": x})
    with np.load(tmp_path / "ckpt", allow_pickle=False) as z:
        assert z["x"].dtype == np.uint16
        np.testing.assert_array_equal(z["x"], np.asarray(x).view(np.uint16))


_V1_BITS_KINDS = "biufc"  # version 1 stored every other dtype (ml_dtypes) as raw bits


def _save_v1(path, tree):
    """fbp.io's version-1 writer, reproduced: entries leaf_0, leaf_1, ... in depth-first order."""
    leaves = []

    def describe(x):
        if x is None:
            return {"kind": "none"}
        if isinstance(x, dict):
            return {"kind": "dict", "keys": list(x), "children": [describe(v) for v in x.values()]}
        if hasattr(type(x), "_fields"):
            node = {"kind": "namedtuple", "name": type(x).__name__, "fields": list(x._fields)}
            return node | {"children": [describe(v) for v in x]}
        if isinstance(x, (list, tuple)):
            kind = "list" if isinstance(x, list) else "tuple"
            return {"kind": kind, "children": [describe(v) for v in x]}
        kind = "python" if isinstance(x, (bool, int, float)) else "array"
        kind = "numpy" if isinstance(x, np.generic) else kind
        a = np.asarray(x)
        name = a.dtype.name
        if a.dtype.kind not in _V1_BITS_KINDS:
            a = a.view(f"uint{8 * a.dtype.itemsize}")
        leaves.append(a)
        return {"kind": "leaf", "index": len(leaves) - 1, "dtype": name, "shape": list(a.shape)} | {
            "as": kind
        }

    tree_json = json.dumps({"format": "fbp.io", "version": 1, "tree": describe(tree)})
    entries = {f"leaf_{i}": a for i, a in enumerate(leaves)}
    entries["__tree__"] = np.frombuffer(tree_json.encode("utf-8"), dtype=np.uint8)
    with open(path, "wb") as f:
        np.savez(f, **entries)


@pytest.mark.parametrize("name", ["all_dtypes", "params_and_state", "python_and_numpy_scalars"])
def test_version_1_files_still_load(tmp_path, name):
    tree = TREES[name]()
    _save_v1(tmp_path / "v1", tree)
    with np.load(tmp_path / "v1", allow_pickle=False) as z:
        assert "leaf_0" in z.files
    _assert_same_tree(fio.load(tmp_path / "v1"), tree)
    loaded = fio.load(tmp_path / "v1", like=tree)
    assert jax.tree.structure(loaded) == jax.tree.structure(tree)
    with pytest.raises(fio.CheckpointError, match=r"like\['extra'\] does not match|keys"):
        fio.load(tmp_path / "v1", like={"extra": np.zeros(1)})


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
    with pytest.raises(fio.CheckpointError) as err:
        fio.load(tmp_path / "ckpt", like=like)
    message = str(err.value)
    assert f"{path} does not match" in message and str(tmp_path / "ckpt") in message
    for side in sides:
        assert side in message


def test_like_with_missing_top_level_key(tmp_path):
    fio.save(tmp_path / "ckpt", {"params": _params(), "step": 3})
    with pytest.raises(fio.CheckpointError, match=r"like does not match: .*keys \['params'\]"):
        fio.load(tmp_path / "ckpt", like={"params": _params()})


def test_like_leaves_must_be_array_like(tmp_path):
    fio.save(tmp_path / "ckpt", {"w": np.zeros(2)})
    with pytest.raises(TypeError, match="like leaves must be arrays"):
        fio.load(tmp_path / "ckpt", like={"w": "text"})


# ------------------------------------------------------------------- crafting damaged files


def _members(path) -> dict:
    """The entries of an .npz, read with numpy alone."""
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _write_members(path, members: dict, compression=zipfile.ZIP_STORED) -> None:
    """An .npz of ``members`` (arrays, possibly object arrays, or raw bytes for an entry)."""
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, a in members.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
                if isinstance(a, bytes):
                    f.write(a)
                else:
                    np.lib.format.write_array(f, np.asarray(a), allow_pickle=True)


def _json_entry(header) -> np.ndarray:
    text = header if isinstance(header, str) else json.dumps(header)
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)


def _npy(shape, descr: str, data: bytes) -> bytes:
    """A .npy file's bytes with any header and data, consistent or not."""
    buf = stdio.BytesIO()
    header = {"descr": descr, "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue() + data


def _small() -> dict:
    return {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.zeros(3), "step": 3}


def _good(path) -> bytes:
    fio.save(path, _small())
    return path.read_bytes()


def _crafted(mutate):
    """A builder: a good checkpoint whose entries and tree description ``mutate`` changes."""

    def build(path):
        fio.save(path, _small())
        members = _members(path)
        header = json.loads(bytes(members["__tree__"]))
        original = members["__tree__"]
        mutate(members, header)
        if members.get("__tree__") is original:  # else the mutation replaced the entry itself
            members["__tree__"] = _json_entry(header)
        _write_members(path, members)

    return build


def _leaf_node(header, key):
    tree = header["tree"]
    return tree["children"][tree["keys"].index(key)]


def _set_leaf(key, **fields):
    return _crafted(lambda m, h: _leaf_node(h, key).update(fields))


def _set_member(name, value):
    return _crafted(lambda m, h: m.__setitem__(name, value))


def _set_header(**fields):
    return _crafted(lambda m, h: h.update(fields))


def _bytes(data):
    return lambda path: path.write_bytes(data if isinstance(data, bytes) else data(path))


def _truncated(fraction):
    return _bytes(lambda path: _good(path)[: int(len(_good(path)) * fraction)])


def _flip_in_w(path) -> bytes:
    data = bytearray(_good(path))
    at = bytes(data).find(_small()["w"].tobytes()) + 20
    data[at] ^= 0x10
    return bytes(data)


def _plain_npz(path):
    with open(path, "wb") as f:
        np.savez(f, w=np.zeros(2))


def _npy_file(path):
    with open(path, "wb") as f:
        np.save(f, np.zeros(2))


def _compressed(path):
    fio.save(path, _small())
    _write_members(path, _members(path), zipfile.ZIP_DEFLATED)


def _nested_json(depth):
    node = '{"kind": "list", "children": [' * depth + "]}" * depth
    return _set_member(
        "__tree__", _json_entry(f'{{"format": "fbp.io", "version": 2, "tree": {node}}}')
    )


def _overlapping(path):
    """Entry 'a' (a uint8 leaf) holds entry 'b''s whole zip record: the entries overlap, as in a
    zip bomb, and add up to more bytes than the file has. Each entry alone is valid."""
    b = np.arange(1000.0)
    inner = stdio.BytesIO()
    with zipfile.ZipFile(inner, "w") as z, z.open("b.npy", "w") as f:
        np.lib.format.write_array(f, b)
    with zipfile.ZipFile(inner) as z:
        b_info, record = z.getinfo("b.npy"), inner.getvalue()[: z.start_dir]
    fio.save(path, {"a": np.frombuffer(record, np.uint8), "b": b})
    members = _members(path)
    del members["b"]
    _write_members(path, members)
    b_info.header_offset = path.read_bytes().find(record)
    with zipfile.ZipFile(path, "a") as z:
        z.filelist.append(b_info)
        z.NameToInfo[b_info.filename] = b_info
        z.writestr("pad", b"")  # a change: zipfile writes a new central directory on close


def _v1_without_leaf_1(path):
    _save_v1(path, _small())
    members = _members(path)
    del members["leaf_1"]
    _write_members(path, members)


class _Payload:
    """Unpickling this calls ``_record``: proof that code ran during a load."""

    def __reduce__(self):
        return (_record, ("code ran while loading",))


EXECUTED = []


def _record(tag):
    EXECUTED.append(tag)
    return tag


_OBJECTS = np.array([_Payload(), None], dtype=object)

BAD_FILES = [  # (id, build(path), regular expression the message must match)
    ("empty", _bytes(b""), "empty"),
    ("truncated-10-bytes", _bytes(lambda p: _good(p)[:10]), "truncated"),
    ("truncated-half", _truncated(0.5), "truncated"),
    ("truncated-90%", _truncated(0.9), "truncated"),
    ("truncated-1-byte", _bytes(lambda p: _good(p)[:-1]), "truncated"),
    ("bit-flip-in-data", _bytes(_flip_in_w), "CRC"),
    ("random-bytes", _bytes(np.random.default_rng(1).bytes(3000)), "not a zip file"),
    ("raw-pickle", _bytes(pickle.dumps({"w": _Payload()})), "not a zip file"),
    ("text", _bytes(b"hello, world\n"), "not a zip file"),
    ("single-npy", _npy_file, r"single \.npy array"),
    ("plain-npz", _plain_npz, "not an fbp checkpoint: the zip has no __tree__"),
    ("zip-of-text", _set_member("__tree__", b"not an npy"), r"not a readable \.npy"),
    ("tree-not-bytes", _set_member("__tree__", np.arange(3.0)), "not a byte string"),
    ("tree-empty-entry", _set_member("__tree__", b""), r"not a readable \.npy"),
    ("tree-bad-utf8", _set_member("__tree__", np.frombuffer(b"\xff{", np.uint8)), "not UTF-8"),
    ("tree-bad-json", _set_member("__tree__", _json_entry("{not json")), "not valid JSON"),
    ("tree-deep-json", _nested_json(100_000), "not valid JSON|nested too deeply"),
    ("tree-a-list", _set_member("__tree__", _json_entry("[1, 2]")), "not an fbp checkpoint"),
    ("other-format", _set_header(format="other"), "not an fbp checkpoint"),
    ("version-3", _set_header(version=3), "unknown format version 3:.*newer"),
    ("version-str", _set_header(version="2"), "unknown format version '2'"),
    ("version-bool", _set_header(version=True), "unknown format version True"),
    ("no-tree", _crafted(lambda m, h: h.pop("tree")), "corrupt tree description"),
    ("unknown-kind", _crafted(lambda m, h: h["tree"].update(kind="set")), "unknown node kind"),
    ("keys-vs-children", _crafted(lambda m, h: h["tree"]["keys"].pop()), "do not match its"),
    ("dup-keys", _crafted(lambda m, h: h["tree"].update(keys=["w", "w", "x"])), "do not match"),
    ("dtype-object", _set_leaf("w", dtype="object"), "unsupported dtype 'object'"),
    ("dtype-missing", _set_leaf("w", dtype=None), "unsupported dtype None"),
    ("shape-negative", _set_leaf("w", shape=[-1, 4]), "invalid shape"),
    ("shape-float", _set_leaf("w", shape=[3.0, 4]), "invalid shape"),
    ("shape-65-dims", _set_leaf("w", shape=[1] * 65), "invalid shape"),
    ("scalar-with-shape", _set_leaf("w", **{"as": "python"}), "invalid leaf type"),
    ("entry-not-str", _set_leaf("w", entry=5), "invalid entry name"),
    ("entry-is-tree", _set_leaf("w", entry="__tree__"), "invalid entry name"),
    ("entry-twice", _set_leaf("b", entry="w"), "both name entry 'w'"),
    ("entry-missing", _crafted(lambda m, h: m.pop("w")), "entry 'w' is missing"),
    ("v1-entry-missing", _v1_without_leaf_1, "entry 'leaf_1' is missing"),
    (
        "namedtuple-bad-field",
        _crafted(
            lambda m, h: h.update(
                tree={"kind": "namedtuple", "name": "S", "fields": ["1x"], "children": [{}]}
            )
        ),
        "invalid NamedTuple",
    ),
    (
        "entry-dtype-mismatch",
        _set_member("w", _small()["w"].astype(np.float64)),
        r"'w' holds a float64 array .* records float32 \(3, 4\).*does not match its description",
    ),
    (
        "entry-shape-mismatch",
        _set_member("w", _small()["w"].reshape(4, 3)),
        r"'w' holds a float32 array of shape \(4, 3\) .* records float32 \(3, 4\)",
    ),
    ("entry-bits-mismatch", _set_leaf("w", dtype="bfloat16"), "declares|does not match"),
    ("object-leaf", _set_member("w", _OBJECTS), "object array: fbp.io refuses object"),
    ("object-tree", _set_member("__tree__", _OBJECTS), "object array: fbp.io refuses object"),
    ("compressed", _compressed, "compressed"),
    ("huge-shape-in-json", _set_leaf("w", shape=[10**12]), r"declares .* \(4000000000000 bytes\)"),
    (
        "huge-shape-in-json-and-npy",
        _crafted(
            lambda m, h: (
                _leaf_node(h, "w").update(shape=[2**28]),
                m.update(w=_npy((2**28,), "<f4", bytes(48))),
            )
        ),
        "declares",
    ),
    ("overlapping-entries", _overlapping, "more than the file's"),
    ("npy-data-short", _set_member("w", _npy((3, 4), "<f4", bytes(40))), "holds 40 bytes"),
    ("npy-data-long", _set_member("w", _npy((3, 4), "<f4", bytes(60))), "holds 60 bytes"),
    (
        "npy-bad-header",
        _set_member("w", _npy((3, 4), "<f4", bytes(48)).replace(b"descr", b"dexcr")),
        r"not a readable \.npy",
    ),
    ("npy-unknown-dtype", _set_member("w", _npy((3, 4), "<q9", bytes(48))), r"readable \.npy"),
    ("tree-npy-huge", _set_member("__tree__", _npy((2**23,), "|u1", b"{}")), "holds 2 bytes"),
    ("tree-npy-over-limit", _set_member("__tree__", _npy((2**27,), "|u1", b"")), "over the"),
]


def _check_error(error: BaseException, path) -> None:
    """The one error type, naming the path, never suggesting to unpickle."""
    assert type(error) is fio.CheckpointError and isinstance(error, ValueError)
    assert error.path == str(path) and str(path) in str(error)
    assert "allow_pickle" not in str(error)


@contextlib.contextmanager
def _peak_allocation():
    """Yields a function giving the peak of memory allocated (numpy arrays included) inside."""
    peak = []
    tracemalloc.start()
    try:
        yield lambda: peak[0]
    finally:
        peak.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()


def _justified(path) -> int:
    """What loading a file of N bytes may allocate: 10 N + 1 MiB."""
    return 10 * os.path.getsize(path) + 2**20


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    """A load before any measurement, so that lazy imports and caches are not counted."""
    path = tmp_path_factory.mktemp("warm") / "ckpt"
    fio.save(path, {"t": _all_dtypes(), "s": _state()})
    fio.load(path)


@pytest.mark.parametrize(
    "build, pattern", [r[1:] for r in BAD_FILES], ids=[r[0] for r in BAD_FILES]
)
def test_damaged_or_foreign_files_raise_checkpoint_error(tmp_path, warm, build, pattern):
    path = tmp_path / "ckpt"
    build(path)
    EXECUTED.clear()
    with _peak_allocation() as peak, pytest.raises(fio.CheckpointError) as err:
        fio.load(path)
    _check_error(err.value, path)
    assert re.search(pattern, str(err.value)), str(err.value)
    assert peak() <= _justified(path), f"allocated {peak()} bytes for a {path.stat().st_size} file"
    assert EXECUTED == []


def test_crafted_entry_dtype_and_shape_are_checked_also_with_like(tmp_path):
    """The dtype and shape in an entry's own .npy header must match the tree description."""
    for bad in (_small()["w"].astype(np.int32), _small()["w"].reshape(2, 6)):
        fio.save(tmp_path / "ckpt", _small())
        members = _members(tmp_path / "ckpt")
        members["w"] = bad
        _write_members(tmp_path / "ckpt", members)
        with pytest.raises(fio.CheckpointError, match="does not match its description"):
            fio.load(tmp_path / "ckpt", like=_small())


def test_missing_file_and_directory_raise_the_usual_os_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        fio.load(tmp_path / "nothing")
    with pytest.raises(IsADirectoryError):
        fio.load(tmp_path)


def test_checkpoint_error_pickles_and_takes_a_plain_message():
    error = pickle.loads(pickle.dumps(fio.CheckpointError("/x/ckpt: truncated", "/x/ckpt")))
    assert str(error) == "/x/ckpt: truncated" and error.path == "/x/ckpt"
    error = fio.CheckpointError("/x/ckpt: not a training checkpoint")  # as fbp.checkpoint raises
    assert str(error) == "/x/ckpt: not a training checkpoint" and error.path is None


def test_the_tree_description_size_is_limited(tmp_path, monkeypatch):
    fio.save(tmp_path / "ckpt", _small())
    monkeypatch.setattr(fio, "_MAX_TREE_BYTES", 100)
    with pytest.raises(fio.CheckpointError, match="over the 100 limit"):
        fio.load(tmp_path / "ckpt")
    with pytest.raises(ValueError, match=r"over fbp\.io's limit of 100"):
        fio.save(tmp_path / "new", _small())
    assert os.listdir(tmp_path) == ["ckpt"]


# ------------------------------------------------------------------------------------- fuzzing


class _Hang(BaseException):
    """A load took far too long (a BaseException, so that no ``except`` in fbp.io catches it)."""


@contextlib.contextmanager
def _time_limit(seconds: float):
    def alarm(signum, frame):
        raise _Hang(f"a load took over {seconds} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _fuzz_tree() -> dict:
    return {
        "w": np.arange(12, dtype=np.float32).reshape(3, 4),
        "b": np.arange(3).astype(jnp.bfloat16),
        "opt": AdamState(count=np.array(3, np.int32), mu={"x": np.ones(2)}, nu={"x": np.zeros(2)}),
        "step": 7,
        "lr": np.float32(0.5),
        "none": None,
        "t": (np.arange(4, dtype=np.uint8), [True]),
    }


@pytest.fixture(scope="module")
def fuzz_files(tmp_path_factory, warm):
    """(directory, {"v2": bytes, "v1": bytes}) of a small checkpoint holding every node kind."""
    directory = tmp_path_factory.mktemp("fuzz")
    fio.save(directory / "v2", _fuzz_tree())
    _save_v1(directory / "v1", _fuzz_tree())
    return directory, {v: (directory / v).read_bytes() for v in ("v2", "v1")}


def _load_fuzzed(path, data: bytes):
    """Load ``data`` from ``path``: the tree, or None after a proper CheckpointError; within
    20 s and the allocation the file's size justifies."""
    path.write_bytes(data)
    got = None
    with _time_limit(20), _peak_allocation() as peak:
        try:
            got = fio.load(path)
        except fio.CheckpointError as e:
            _check_error(e, path)
    assert peak() <= _justified(path), f"allocated {peak()} bytes for a {len(data)} byte file"
    return got


_BYTE_MUTATIONS = st.one_of(
    st.tuples(st.just("truncate"), st.integers(min_value=0)),
    st.tuples(st.just("flip"), st.lists(st.integers(min_value=0), min_size=1, max_size=4)),
    st.tuples(st.just("overwrite"), st.tuples(st.integers(min_value=0), st.binary(min_size=1))),
    st.tuples(st.just("random"), st.binary(max_size=3000)),
    st.tuples(st.just("zip-like"), st.binary(max_size=600)),
)


def _mutate_bytes(data: bytes, mutation) -> bytes:
    kind, arg = mutation
    if kind == "truncate":
        return data[: arg % len(data)]
    if kind == "flip":
        out = bytearray(data)
        for bit in arg:
            out[(bit // 8) % len(out)] ^= 1 << (bit % 8)
        return bytes(out)
    if kind == "overwrite":
        at, chunk = arg[0] % len(data), arg[1]
        return data[:at] + chunk + data[at + len(chunk) :]
    return arg if kind == "random" else b"PK\x03\x04" + arg


_FUZZ_SETTINGS = dict(  # a per-example deadline; _time_limit also stops a real hang
    deadline=timedelta(seconds=5), suppress_health_check=[HealthCheck.too_slow], database=None
)


@pytest.mark.parametrize("version", ["v2", "v1"])
@settings(max_examples=200, **_FUZZ_SETTINGS)
@given(mutation=_BYTE_MUTATIONS)
def test_fuzzed_bytes_load_exactly_or_raise_checkpoint_error(fuzz_files, version, mutation):
    """Truncations, bit flips, overwrites, random files: a CheckpointError, or (when the change
    hit bytes the reader ignores) exactly the saved tree; never a hang or a large allocation."""
    directory, originals = fuzz_files
    data = _mutate_bytes(originals[version], mutation)
    got = _load_fuzzed(directory / "fuzzed", data)
    if got is not None:
        _assert_same_tree(got, _fuzz_tree())


_WORDS = ["leaf", "dict", "list", "tuple", "namedtuple", "none", "float32", "bfloat16", "uint8"]
_WORDS += ["object", "array", "python", "numpy", "w", "b", "opt/count", "__tree__", "fbp.io"]
_KEYS = ["kind", "keys", "children", "dtype", "shape", "as", "entry", "index", "name", "fields"]
_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-2, max_value=2**70)
    | st.floats(allow_nan=True)
    | st.sampled_from(_WORDS)
    | st.text(max_size=3),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(_KEYS) | st.text(max_size=2), inner, max_size=4)
    ),
    max_leaves=8,
)
_VALUES = st.one_of(  # plausible values too, so that files get past the first checks
    st.lists(st.integers(min_value=0, max_value=2**62), max_size=3),
    st.sampled_from([*sorted(fio._PLAIN_DTYPES), "bfloat16", "int4", "float8_e4m3fn"]),
    _JSON,
)
_ARRAYS = hnp.arrays(
    dtype=st.sampled_from([np.float32, np.float64, np.int32, np.uint8, np.uint16, np.bool_]),
    shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4),
)


def _positions(value, out=None) -> list:
    """Every (container, key) in a JSON value."""
    out = [] if out is None else out
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for key, child in items:
        out.append((value, key))
        if isinstance(child, (dict, list)):
            _positions(child, out)
    return out


@pytest.mark.parametrize("version", ["v2", "v1"])
@settings(max_examples=100, **_FUZZ_SETTINGS)
@given(data=st.data())
def test_fuzzed_tree_descriptions_and_entries_raise_only_checkpoint_error(
    fuzz_files, version, data
):
    """Valid zips with a mangled tree description or a replaced entry: the structure checks
    must turn every inconsistency into a CheckpointError (no KeyError, TypeError, ...)."""
    directory, originals = fuzz_files
    (directory / "crafted").write_bytes(originals[version])
    members = _members(directory / "crafted")
    header = json.loads(bytes(members["__tree__"]))
    for _ in range(data.draw(st.integers(1, 3), label="changes")):
        container, key = data.draw(st.sampled_from(_positions(header)), label="where")
        if data.draw(st.booleans(), label="delete") and isinstance(container, dict):
            del container[key]
        else:
            container[key] = data.draw(_VALUES, label="value")
        if not _positions(header):
            break
    members["__tree__"] = _json_entry(header)
    if data.draw(st.booleans(), label="replace an entry"):
        name = data.draw(st.sampled_from(sorted(set(members) - {"__tree__"})), label="entry")
        members[name] = data.draw(_ARRAYS, label="array")
    _write_members(directory / "crafted", members)
    _load_fuzzed(directory / "crafted", (directory / "crafted").read_bytes())


# ------------------------------------------------------------------------- refusing pickled data


def test_object_arrays_are_refused_without_unpickling(tmp_path):
    fio.save(tmp_path / "good", {"w": np.zeros(2)})
    entries = _members(tmp_path / "good")
    entries["w"] = np.array([_Payload(), None], dtype=object)
    _write_members(tmp_path / "evil", entries)
    assert pickle.loads(pickle.dumps(_Payload())) == "code ran while loading"  # the trap works
    EXECUTED.clear()
    with pytest.raises(fio.CheckpointError, match="refuses object"):
        fio.load(tmp_path / "evil")
    with pytest.raises(fio.CheckpointError, match="refuses object"):
        fio.load(tmp_path / "evil", like={"w": np.zeros(2)})
    _save_v1(tmp_path / "good_v1", {"w": np.zeros(2)})
    entries = _members(tmp_path / "good_v1")
    entries["leaf_0"] = np.array([_Payload(), None], dtype=object)
    _write_members(tmp_path / "evil_v1", entries)
    with pytest.raises(fio.CheckpointError, match="refuses object"):
        fio.load(tmp_path / "evil_v1")
    assert EXECUTED == []


def test_object_tree_entry_and_raw_pickles_are_refused(tmp_path):
    with open(tmp_path / "evil_tree", "wb") as f:
        np.savez(f, __tree__=np.array([_Payload()], dtype=object))
    with open(tmp_path / "evil_pickle", "wb") as f:
        pickle.dump(_Payload(), f)
    EXECUTED.clear()
    with pytest.raises(fio.CheckpointError, match="refuses object"):
        fio.load(tmp_path / "evil_tree")
    with pytest.raises(fio.CheckpointError, match="not an fbp checkpoint"):
        fio.load(tmp_path / "evil_pickle")
    assert EXECUTED == []


@pytest.mark.parametrize(
    "write, match",
    [
        (lambda f: np.savez(f, w=np.zeros(2)), "no __tree__"),
        (lambda f: np.save(f, np.zeros(2)), "single .npy array"),
        (lambda f: np.savez(f, __tree__=np.frombuffer(b"{not json", np.uint8)), "unreadable"),
    ],
    ids=["plain-npz", "npy", "bad-json"],
)
def test_files_that_are_not_checkpoints_are_refused(tmp_path, write, match):
    with open(tmp_path / "f", "wb") as f:
        write(f)
    with pytest.raises(fio.CheckpointError, match=match):
        fio.load(tmp_path / "f")


@pytest.mark.parametrize(
    "tree, match",
    [
        ({"a": ["text"]}, r"tree\['a'\]\[0\] is a str"),
        ({1: np.zeros(2)}, "dict keys must be str"),
        ({"a": np.array(["x"])}, r"tree\['a'\] has dtype <U1"),
        ({"a": np.zeros(2, dtype=[("x", "f4")])}, r"tree\['a'\] has dtype"),
    ],
)
def test_save_rejects_what_it_cannot_store(tmp_path, tree, match):
    with pytest.raises(TypeError, match=match):
        fio.save(tmp_path / "ckpt", tree)
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------- atomicity


def _half_written_then_fail(f, entries):
    f.write(b"PK\x03\x04 partial zip data")
    raise OSError("disk full")


@pytest.mark.parametrize("failure", ["writer", "replace", "interrupt"])
def test_failed_save_leaves_the_old_checkpoint_and_no_temporary(tmp_path, monkeypatch, failure):
    old = {"w": np.arange(4.0)}
    fio.save(tmp_path / "ckpt", old)
    before = (tmp_path / "ckpt").read_bytes()
    if failure == "writer":
        monkeypatch.setattr(fio, "_write_zip", _half_written_then_fail)
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


def _temporaries(directory) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.endswith(".tmp"))


def test_stale_temporaries_of_the_target_are_removed_and_nothing_else(tmp_path):
    stale = [".ckpt.fbpsave-0123456789abcdef.tmp", ".ckpt.fbpsave-fedcba9876543210.tmp"]
    kept = [
        ".ckpt.fbpsave-0123.tmp",  # not the pattern
        ".ckpt.0123456789abcdef.tmp",  # fbp.io v1's naming: a v1 writer could still be live
        ".other.fbpsave-0123456789abcdef.tmp",  # another target
        ".ckpt2.fbpsave-0123456789abcdef.tmp",
        "ckpt.fbpsave-0123456789abcdef.tmp",
    ]
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"left by a killed save")
    (tmp_path / "target").write_bytes(b"not to be followed")
    os.symlink(tmp_path / "target", tmp_path / ".ckpt.fbpsave-00000000000000ff.tmp")
    os.mkdir(tmp_path / ".ckpt.fbpsave-0000000000000aaa.tmp")
    kept += [".ckpt.fbpsave-00000000000000ff.tmp", ".ckpt.fbpsave-0000000000000aaa.tmp"]
    fio.save(tmp_path / "ckpt", {"w": np.zeros(2)})
    assert sorted(os.listdir(tmp_path)) == sorted([*kept, "ckpt", "target"])
    assert (tmp_path / "target").read_bytes() == b"not to be followed"


def test_a_temporary_locked_through_another_open_file_is_kept(tmp_path):
    import fcntl

    live = tmp_path / ".ckpt.fbpsave-0123456789abcdef.tmp"
    with open(live, "wb") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # as a live save holds it (another open file description)
        fio.save(tmp_path / "ckpt", {"w": np.zeros(2)})
        assert live.exists()
    fio.save(tmp_path / "ckpt", {"w": np.zeros(2)})  # the lock is gone: now it is stale
    assert os.listdir(tmp_path) == ["ckpt"]


def test_concurrent_saves_from_threads_all_succeed(tmp_path):
    errors = []

    def work(i):
        try:
            for j in range(10):
                fio.save(tmp_path / "ckpt", {"w": np.full(1000, 10 * i + j)})
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert os.listdir(tmp_path) == ["ckpt"]
    w = fio.load(tmp_path / "ckpt")["w"]
    assert (w == w[0]).all()


# ------------------------------------------------------------ faults injected into a live process

BIG = 16_000_000  # float32s: a 64 MB save, slow enough to be caught in the middle

CHILD = """
import importlib, os, signal, sys
sys.path.insert(0, sys.argv[1])
import numpy as np
fio = importlib.import_module(sys.argv[2])  # the module under test, imported as the tests do

path, mode = sys.argv[3], sys.argv[4]
if mode == "hold":  # a live writer: create and lock a temporary file as save does, then wait
    target = os.path.abspath(path)
    fd, tmp = fio._create_temporary(os.path.dirname(target), os.path.basename(target), [])
    print(tmp, flush=True)
    sys.stdin.read()
    sys.exit(0)
stop = []
if mode == "exit-handler":
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(3))
elif mode == "flag-handler":  # graceful shutdown: finish the save in progress, then stop
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.append(signum))
big = np.arange(int(sys.argv[5]), dtype=np.float32)
step = 0
while not stop:
    step += 1
    fio.save(path, {"big": big, "step": step})
print(step, flush=True)
"""


def _child(tmp_path, target, mode) -> subprocess.Popen:
    script = tmp_path / "child.py"  # beside the checkpoints' directory, not in it
    script.write_text(CHILD)
    root = os.path.abspath(fio.__file__)
    for _ in range(fio.__name__.count(".") + 1):  # fbp_io.py: its directory; fbp/io.py: fbp's
        root = os.path.dirname(root)
    args = [sys.executable, str(script), root, fio.__name__, str(target), mode, str(BIG)]
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    return subprocess.Popen(args, stdin=subprocess.PIPE, **pipes)


def _wait_for(predicate, proc, what: str, timeout: float = 120.0):
    """Poll (a slow shared machine may take long to start the child); fail if it died."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"the child exited ({proc.returncode}) before {what}: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.002)


def _reap(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait(timeout=120)
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        with contextlib.suppress(OSError):
            pipe.close()


def _checkpoint_in(tmp_path):
    directory = tmp_path / "ckpts"
    directory.mkdir(parents=True)
    return directory / "ckpt"


def _assert_intact(target) -> dict:
    tree = fio.load(target)
    assert tree["step"] >= 1
    np.testing.assert_array_equal(tree["big"], np.arange(BIG, dtype=np.float32))
    return tree


def test_sigkill_mid_save_keeps_the_old_checkpoint_and_the_next_save_cleans_up(tmp_path):
    """Children saving 64 MB in a loop, killed 0, 50 and 200 ms after a save's temporary file
    appeared (they start together, to share the cost of starting Python and jax)."""
    delays = [0.0, 0.05, 0.2]
    runs = []
    try:
        for i in range(len(delays)):
            target = _checkpoint_in(tmp_path / f"run{i}")
            runs.append((target, _child(tmp_path / f"run{i}", target, "loop")))
        for delay, (target, proc) in zip(delays, runs, strict=True):
            _wait_for(target.exists, proc, "the first save")
            _wait_for(lambda d=target.parent: _temporaries(d), proc, "a second save's temporary")
            time.sleep(delay)
            proc.kill()
    finally:
        for _, proc in runs:
            _reap(proc)
    for delay, (target, _) in zip(delays, runs, strict=True):
        if delay == 0.0:
            assert _temporaries(target.parent), "the child was not killed in the middle of a save"
        _assert_intact(target)
        fio.save(target, {"small": np.zeros(2)})
        assert os.listdir(target.parent) == ["ckpt"], f"killed {delay} s into a save"


@pytest.mark.parametrize(
    "mode, returncode",
    [("loop", -signal.SIGTERM), ("exit-handler", 3), ("flag-handler", 0)],
    ids=["default-action", "handler-exits", "handler-sets-a-flag"],
)
def test_sigterm_mid_save_leaves_no_temporary(tmp_path, mode, returncode):
    """SIGTERM's default action: the save removes its temporary file, then the process dies by
    SIGTERM. A program's own handler is kept: if it exits, the save cleans up; if it only sets a
    flag, the save in progress completes."""
    target = _checkpoint_in(tmp_path)
    proc = _child(tmp_path, target, mode)
    try:
        _wait_for(target.exists, proc, "the first save")
        _wait_for(lambda: _temporaries(target.parent), proc, "a second save's temporary")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        _reap(proc)
    assert proc.returncode == returncode, err
    assert _temporaries(target.parent) == []
    tree = _assert_intact(target)
    if mode == "flag-handler":
        assert tree["step"] == int(out) >= 2  # the save under way when SIGTERM came completed


def test_another_process_save_keeps_a_live_writers_temporary(tmp_path):
    target = _checkpoint_in(tmp_path)
    stale = target.parent / ".ckpt.fbpsave-0123456789abcdef.tmp"
    stale.write_bytes(b"left by a killed save")
    proc = _child(tmp_path, target, "hold")
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 120)
        assert ready, "timed out waiting for the child's temporary file"
        live = proc.stdout.readline().strip()
        assert live and os.path.exists(live), proc.stderr.read()
        fio.save(target, {"w": np.zeros(2)})
        assert os.path.exists(live) and not stale.exists()
        proc.stdin.close()  # the writer exits without removing its temporary, as after SIGKILL
        assert proc.wait(timeout=120) == 0
    finally:
        _reap(proc)
    assert os.path.exists(live)
    fio.save(target, {"w": np.ones(2)})
    assert os.listdir(target.parent) == ["ckpt"]
