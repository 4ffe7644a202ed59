"""Checkpoints: ``save(path, tree)`` and ``load(path, like=None)`` for pytrees of arrays.

    save(path, tree)              writes ``tree`` atomically to ``path`` (exactly that name)
    load(path)         -> tree    dicts, lists, tuples, namedtuples, None; leaves as numpy arrays
    load(path, like=t) -> tree    checked against ``t`` (structure, shapes, dtypes), built like ``t``
    Invariant: load(p, like=t) equals t, bit for bit and dtype for dtype, after save(p, t).

Trees are nested dicts (str keys), lists, tuples, NamedTuples (e.g. optimizer states) and
``None``; leaves are numpy or jax arrays (bool, ints, uints, floats, complex, and ml_dtypes
floats such as bfloat16), numpy scalars and Python bool/int/float.

The file is an ordinary ``.npz`` (a zip of ``.npy`` files, no compression): leaves are entries
``leaf_0, leaf_1, ...`` in depth-first order, and ``__tree__`` is a uint8 array holding UTF-8
JSON that describes the structure, every leaf's dtype and shape, and NamedTuples' type name and
fields. bfloat16 (and other ml_dtypes) leaves, which ``.npy`` cannot describe, are stored as their
raw bits (a same-width unsigned int) and viewed back on load. ``np.load(path)["leaf_0"]`` works
without fbp.

Loading never executes code: ``np.load(..., allow_pickle=False)`` refuses object arrays and the
JSON is read with ``json`` only. Saving writes a temporary file in the target's directory, fsyncs
it and ``os.replace``-s it onto ``path``, so a crash leaves either the old file or the new one.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import os
import secrets
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["load", "save"]

PyTree = Any
_FORMAT = {"format": "fbp.io", "version": 1}
_PLAIN_KINDS = "biufc"  # bool, int, uint, float, complex: stored natively by .npy
_ML_DTYPES = (  # jax dtypes that .npy cannot describe: stored as raw bits, restored by name
    "bfloat16",
    "float8_e3m4",
    "float8_e4m3",
    "float8_e4m3b11fnuz",
    "float8_e4m3fn",
    "float8_e4m3fnuz",
    "float8_e5m2",
    "float8_e5m2fnuz",
    "float8_e8m0fnu",
    "int4",
    "uint4",
)
_BITS_DTYPES = {n: np.dtype(getattr(jnp, n)) for n in _ML_DTYPES if hasattr(jnp, n)}


def _is_namedtuple(x) -> bool:
    return isinstance(x, tuple) and hasattr(type(x), "_fields")


def _child_paths(kind: str, names: list, path: str) -> list[str]:
    """Display paths of a container's children, in ``jax.tree_util.keystr`` style."""
    if kind == "dict":
        return [f"{path}[{k!r}]" for k in names]
    if kind == "namedtuple":
        return [f"{path}.{f}" for f in names]
    return [f"{path}[{i}]" for i in range(len(names))]


# ---------------------------------------------------------------------------------------- save


def _describe(x, path: str, leaves: list[np.ndarray]) -> dict:
    """JSON description of ``x``; appends its leaves (as storable numpy arrays) to ``leaves``."""
    if x is None:
        return {"kind": "none"}
    if isinstance(x, dict):
        bad = [k for k in x if not isinstance(k, str)]
        if bad:
            raise TypeError(f"save: dict keys must be str, {path} has key {bad[0]!r}")
        node, names, values = {"kind": "dict", "keys": list(x)}, list(x), list(x.values())
    elif _is_namedtuple(x):
        node = {"kind": "namedtuple", "name": type(x).__name__, "fields": list(x._fields)}
        names, values = list(x._fields), list(x)
    elif isinstance(x, (list, tuple)):
        node = {"kind": "list" if isinstance(x, list) else "tuple"}
        names = values = list(x)
    else:
        return _describe_leaf(x, path, leaves)
    paths = _child_paths(node["kind"], names, path)
    node["children"] = [_describe(v, p, leaves) for v, p in zip(values, paths)]
    return node


def _describe_leaf(x, path: str, leaves: list[np.ndarray]) -> dict:
    if isinstance(x, (bool, int, float)):
        kind = "python"
    elif isinstance(x, np.generic):
        kind = "numpy"
    elif isinstance(x, (np.ndarray, jax.Array)):
        kind = "array"
    else:
        raise TypeError(
            f"save: {path} is a {type(x).__name__}; leaves must be arrays or bool/int/float "
            "(containers: dict, list, tuple, NamedTuple, None)"
        )
    a = np.asarray(x)
    name = a.dtype.name
    if name in _BITS_DTYPES:
        a = a.view(f"uint{8 * a.dtype.itemsize}")
    elif a.dtype.kind not in _PLAIN_KINDS:
        raise TypeError(f"save: {path} has dtype {a.dtype}, which fbp.io cannot store")
    leaves.append(a)
    return {
        "kind": "leaf",
        "index": len(leaves) - 1,
        "dtype": name,
        "shape": list(a.shape),
        "as": kind,
    }


def save(path: str | os.PathLike, tree: PyTree) -> None:
    """Write ``tree`` to ``path`` atomically (see the module docstring for the format).

    The file is written exactly at ``path``; unlike ``np.savez`` no ``.npz`` is appended. The
    data goes to a temporary file beside it, is flushed and fsynced, then ``os.replace``-d onto
    ``path``; on any error the temporary file is removed and an existing ``path`` is untouched.
    """
    path = os.fspath(path)
    leaves: list[np.ndarray] = []
    tree_json = json.dumps({**_FORMAT, "tree": _describe(tree, "tree", leaves)})
    entries = {f"leaf_{i}": a for i, a in enumerate(leaves)}
    entries["__tree__"] = np.frombuffer(tree_json.encode("utf-8"), dtype=np.uint8)

    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # umask applies, as for open()
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **entries)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError, AttributeError):  # persist the rename (POSIX only)
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


# ---------------------------------------------------------------------------------------- load

_FREE = object()  # stands for "no ``like``": rebuild the tree from the file's own description


@functools.cache
def _namedtuple(name: str, fields: tuple[str, ...]) -> type:
    """One class per (name, fields), so repeated loads give equal jax treedefs."""
    return collections.namedtuple(name, fields)


def _signature(like) -> dict:
    """What the file must record for ``like``: the node kind and what identifies it."""
    if like is None:
        return {"kind": "none"}
    if isinstance(like, dict):
        return {"kind": "dict", "keys": sorted(like)}
    if _is_namedtuple(like):
        return {"kind": "namedtuple", "name": type(like).__name__, "fields": list(like._fields)}
    if isinstance(like, (list, tuple)):
        return {"kind": "list" if isinstance(like, list) else "tuple", "length": len(like)}
    if isinstance(like, (bool, int, float)):
        like = np.asarray(like)
    if not (hasattr(like, "shape") and hasattr(like, "dtype")):
        raise TypeError(
            f"load: like leaves must be arrays, ShapeDtypeStructs or scalars, not {like!r}"
        )
    return {"kind": "leaf", "dtype": np.dtype(like.dtype).name, "shape": list(like.shape)}


def _file_signature(node: dict) -> dict:
    sig = {k: node[k] for k in ("kind", "name", "fields", "dtype", "shape") if k in node}
    if node["kind"] == "dict":
        sig["keys"] = sorted(node["keys"])
    if node["kind"] in ("list", "tuple"):
        sig["length"] = len(node["children"])
    return sig


def _show(sig: dict) -> str:
    kind = sig["kind"]
    if kind == "leaf":
        return f"a {sig['dtype']} array of shape {tuple(sig['shape'])}"
    if kind == "dict":
        return f"a dict with keys {sig['keys']}"
    if kind == "namedtuple":
        return f"a NamedTuple {sig['name']}({', '.join(sig['fields'])})"
    return "None" if kind == "none" else f"a {kind} of length {sig['length']}"


def _read_leaf(z, node: dict, where: str) -> np.ndarray:
    name = f"leaf_{node['index']}"
    if name not in z.files:
        raise ValueError(f"{where}: corrupt checkpoint, entry {name} is missing")
    try:
        a = z[name]
    except ValueError as e:
        raise ValueError(
            f"{where}: cannot read entry {name} ({e}); fbp.io refuses object (pickled) arrays, "
            "since unpickling can execute code"
        ) from e
    if node["dtype"] in _BITS_DTYPES and a.dtype == f"uint{8 * a.dtype.itemsize}":
        a = a.view(_BITS_DTYPES[node["dtype"]])
    if a.dtype.name != node["dtype"] or list(a.shape) != node["shape"]:
        raise ValueError(
            f"{where}: corrupt checkpoint, entry {name} is {a.dtype.name} {a.shape} but the tree "
            f"description records {node['dtype']} {tuple(node['shape'])}"
        )
    return a


def _build(node: dict, like, path: str, z, where: str):
    """Rebuild ``node`` from the file, checking it against ``like`` unless ``like is _FREE``."""
    kind = node["kind"]
    if kind not in ("none", "leaf", "dict", "namedtuple", "list", "tuple"):
        raise ValueError(f"{where}: corrupt tree description, unknown node kind {kind!r}")
    if like is not _FREE and _file_signature(node) != (want := _signature(like)):
        raise ValueError(
            f"{where}: {path} does not match: `like` has {_show(want)}, "
            f"the file has {_show(_file_signature(node))}"
        )
    if kind == "none":
        return None
    if kind == "leaf":
        a = _read_leaf(z, node, where)
        if like is _FREE:
            return a.item() if node["as"] == "python" else a[()] if node["as"] == "numpy" else a
        if isinstance(like, (jax.Array, jax.ShapeDtypeStruct)):
            sharding = getattr(like, "sharding", None)
            return jax.numpy.asarray(a) if sharding is None else jax.device_put(a, sharding)
        if isinstance(like, np.generic):
            return a[()]
        return a.item() if isinstance(like, (bool, int, float)) else a
    children = node["children"]
    names = {"dict": node.get("keys"), "namedtuple": node.get("fields")}.get(kind, children)
    paths = _child_paths(kind, names, path)
    if kind == "dict":
        found = dict(zip(names, zip(children, paths)))
        keys = names if like is _FREE else list(like)  # like's key order
        return {k: _build(found[k][0], _sub(like, k), found[k][1], z, where) for k in keys}
    values = [
        _build(c, _sub(like, i), p, z, where) for i, (c, p) in enumerate(zip(children, paths))
    ]
    if kind == "namedtuple":
        cls = _namedtuple(node["name"], tuple(names)) if like is _FREE else type(like)
        return cls(*values)
    return values if kind == "list" else tuple(values)


def _sub(like, key):
    return _FREE if like is _FREE else like[key]


def load(path: str | os.PathLike, like: PyTree = None) -> PyTree:
    """Read a tree written by :func:`save`.

    Without ``like``: dicts, lists, tuples and None come back as such, NamedTuples as
    ``collections.namedtuple`` classes with the stored type name and fields, array leaves as
    numpy arrays (whether jax or numpy arrays were saved), scalars as the Python or numpy scalar
    that was saved.

    With ``like`` (a tree of arrays, ``jax.ShapeDtypeStruct``s or scalars, e.g. freshly
    initialised params and optimizer state): the file must have the same structure (dict keys,
    NamedTuple type names and fields, list and tuple lengths, None) and every leaf the same shape
    and dtype, else ValueError naming the first differing path, e.g. ``like['params'][1]['w']``.
    The result is built with ``like``'s container types; a leaf comes back as a jax array (placed
    with ``like``'s sharding) where ``like`` has a jax array or ShapeDtypeStruct, else as the
    numpy array or scalar type ``like`` has.
    """
    where = f"load({os.fspath(path)!r})"
    try:
        z = np.load(path, allow_pickle=False)
    except ValueError as e:
        raise ValueError(f"{where}: not an fbp checkpoint ({e})") from e
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise ValueError(f"{where}: the file holds a single .npy array, not an fbp checkpoint")
    with z:
        try:
            header = json.loads(bytes(z["__tree__"]).decode("utf-8"))
        except KeyError:
            header = None
        except ValueError as e:  # also UnicodeDecodeError, JSONDecodeError, object arrays
            raise ValueError(f"{where}: unreadable __tree__ entry ({e})") from e
        if not isinstance(header, dict) or header.get("format") != _FORMAT["format"]:
            raise ValueError(f"{where}: not an fbp checkpoint (no valid __tree__ entry)")
        if header.get("version") != _FORMAT["version"]:
            raise ValueError(f"{where}: unsupported fbp.io format version {header.get('version')}")
        root = ("tree", _FREE) if like is None else ("like", like)
        try:
            return _build(header["tree"], root[1], root[0], z, where)
        except (KeyError, IndexError, AttributeError) as e:
            raise ValueError(f"{where}: corrupt tree description ({e!r})") from e


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: damaged, not fbp's, or not what was expected."""
