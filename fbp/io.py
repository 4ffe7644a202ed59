"""Checkpoints: ``save(path, tree)`` and ``load(path, like=None)`` for pytrees of arrays.

    save(path, tree)              writes ``tree`` atomically to ``path`` (exactly that name)
    load(path)         -> tree    dicts, lists, tuples, namedtuples, None; leaves as numpy arrays
    load(path, like=t) -> tree    checked against ``t`` (structure, shapes, dtypes), built like ``t``
    CheckpointError               what ``load`` raises for any file it cannot read (a ValueError)
    Invariant: load(p, like=t) equals t, bit for bit and dtype for dtype, after save(p, t).

Trees are nested dicts (str keys), lists, tuples, NamedTuples (e.g. optimizer states) and
``None``; leaves are numpy or jax arrays (bool, ints, uints, floats, complex, and ml_dtypes
floats such as bfloat16), numpy scalars and Python bool/int/float.

Format (version 2)
------------------
The file is an ordinary ``.npz``: a zip of uncompressed ``.npy`` entries. Each leaf is the entry
named by its path in the tree, the path's parts joined by ``/``: a dict key, a list or tuple
index, a NamedTuple field name, e.g. ``params/0/w`` for ``tree["params"][0]["w"]``. In a part,
the characters ``A-Z a-z 0-9 _ - .`` stand for themselves and every other character is
percent-encoded as its UTF-8 bytes (``"a/b"`` -> ``a%2Fb``, ``"ü"`` -> ``%C3%BC``); an empty part
is written ``%`` and a part made only of dots has them encoded (``.`` -> ``%2E``). A tree that is
a single leaf is stored as ``__root__``, and a leaf whose path would be ``__tree__`` as
``%5F_tree__``. The entry ``__tree__`` is a uint8 array holding UTF-8 JSON,
``{"format": "fbp.io", "version": 2, "tree": ...}``, that describes the structure, names every
leaf's entry and records its dtype and shape, and NamedTuples' type name and fields. bfloat16
(and other ml_dtypes) leaves, which ``.npy`` cannot describe, are stored as their raw bits (a
same-width unsigned int) and viewed back on load. So numpy alone reads a checkpoint::

    with np.load(path) as z:                      # allow_pickle=False is numpy's default
        w = z["params/0/w"]                       # a bfloat16 leaf: z[...].view(jnp.bfloat16)
        tree = json.loads(bytes(z["__tree__"]))   # the structure and every leaf's entry name

Version 1 files (fbp before this format, entries ``leaf_0, leaf_1, ...`` in depth-first order)
are still read. Entries that the tree description does not name are ignored.

Crashes
-------
``save`` writes a temporary file ``.{name}.fbpsave-{16 hex digits}.tmp`` beside ``path``, fsyncs
it, ``os.replace``-s it onto ``path`` and fsyncs the directory: a crash at any moment leaves
either the old checkpoint or the new one at ``path``, never a mix. What a crash can leave is the
temporary file. A save removes its temporary file on any exception, on KeyboardInterrupt and on
SIGTERM (see ``save``); after SIGKILL or a power cut the next ``save`` to the same path removes
it. A live save holds an exclusive ``flock`` on its temporary file until it has been renamed, and
a save removes another temporary file for the same target only while it holds that lock itself,
so it never removes a file that a live save (in any process) is writing; process ids, which the
system reuses, play no part. Where ``flock`` is unavailable (Windows) or refused by the file
system, temporary files are never removed by a later save; nor are those of fbp before format 2
(``.{name}.{16 hex digits}.tmp``), whose writers took no lock.

Untrusted files
---------------
Loading never executes code: object (pickled) arrays are refused, the ``.npy`` headers are parsed
by numpy's literal parser and the tree description by ``json``. Every failure to read a file, and
a file that does not match ``like``, raises :class:`CheckpointError`, which names the path and
says what is wrong. Errors opening the path (FileNotFoundError, PermissionError,
IsADirectoryError) are raised unchanged: they concern the path, not a damaged checkpoint. Before
allocating an array ``load`` checks its declared size against the bytes its zip entry really
holds, and the entries it reads, together, against the file's size, so a crafted header cannot
make it allocate more for arrays than the file's size. Parsing the zip directory and the JSON
tree description makes Python objects, at most a few tens of times their size in the file; the
description is limited to 16 MiB (over 100,000 leaves), on save as on load.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import keyword
import math
import os
import re
import secrets
import signal
import stat
import struct
import threading
import zipfile
from typing import Any

try:
    import fcntl
except ImportError:  # no advisory locks (Windows): stale temporaries are then never removed
    fcntl = None

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["CheckpointError", "load", "save"]

PyTree = Any
_FORMAT = "fbp.io"
_VERSION = 2  # version 1: entries leaf_0, leaf_1, ... (still read)
_TREE = "__tree__"  # the entry holding the JSON tree description
_ROOT = "__root__"  # the entry of a tree that is a single leaf
_MAX_TREE_BYTES = 16 << 20  # the JSON tree description's size limit, on save and on load
_MAX_NDIM = 64  # numpy's limit
_CHUNK = 16 << 20  # bytes read at a time into a preallocated array
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # a fixed entry timestamp: equal trees give equal files
_TEMP_TAG = "fbpsave"
_SAFE_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-.")
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
# bool, ints, uints, floats, complex: stored natively by .npy (native byte order)
_PLAIN_DTYPES = {np.dtype(c).name: np.dtype(c) for c in "?bhilqBHILQefdgFDG"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: damaged, not fbp's, or not what was expected.

    ``load`` raises it for every failure to read a file and for a file that does not match
    ``like``, with the message ``"{path}: {what is wrong}"`` and the path in ``path``; code built
    on ``load`` (e.g. ``fbp.checkpoint``) raises it too, perhaps without ``path``.
    """

    def __init__(self, message: str, path: str | None = None):
        super().__init__(message)
        self.path = path  # in ``__dict__``, so it survives pickling


def _is_jax_array(x) -> bool:
    return isinstance(x, jax.Array)


def _is_namedtuple(x) -> bool:
    return isinstance(x, tuple) and hasattr(type(x), "_fields")


def _child_paths(kind: str, names: list, path: str) -> list[str]:
    """Display paths of a container's children, in ``jax.tree_util.keystr`` style."""
    if kind == "dict":
        return [f"{path}[{k!r}]" for k in names]
    if kind == "namedtuple":
        return [f"{path}.{f}" for f in names]
    return [f"{path}[{i}]" for i in range(len(names))]


def _quote(part: str) -> str:
    """One path part of an entry name (see the module docstring): injective, no ``/``."""
    if not part:
        return "%"
    out = "".join(
        c if c in _SAFE_CHARS else "".join(f"%{b:02X}" for b in c.encode("utf-8", "surrogatepass"))
        for c in part
    )
    return out.replace(".", "%2E") if not out.strip(".") else out


def _entry_name(parts: list[str]) -> str:
    if not parts:
        return _ROOT
    name = "/".join(map(_quote, parts))
    return "%5F" + name[1:] if name == _TREE else name


# ---------------------------------------------------------------------------------------- save


def _describe(x, path: str, parts: list[str], leaves: list) -> dict:
    """JSON description of ``x``; appends ``(entry name, storable array)`` pairs to ``leaves``."""
    if x is None:
        return {"kind": "none"}
    if isinstance(x, dict):
        bad = [k for k in x if not isinstance(k, str)]
        if bad:
            raise TypeError(f"save: dict keys must be str, {path} has key {bad[0]!r}")
        node, names, values = {"kind": "dict", "keys": list(x)}, list(x), list(x.values())
        subparts = names
    elif _is_namedtuple(x):
        node = {"kind": "namedtuple", "name": type(x).__name__, "fields": list(x._fields)}
        names = subparts = list(x._fields)
        values = list(x)
    elif isinstance(x, (list, tuple)):
        node = {"kind": "list" if isinstance(x, list) else "tuple"}
        names = values = list(x)
        subparts = [str(i) for i in range(len(x))]
    else:
        return _describe_leaf(x, path, parts, leaves)
    paths = _child_paths(node["kind"], names, path)
    node["children"] = [
        _describe(v, p, [*parts, s], leaves)
        for v, p, s in zip(values, paths, subparts, strict=True)
    ]
    return node


def _describe_leaf(x, path: str, parts: list[str], leaves: list) -> dict:
    if isinstance(x, (bool, int, float)):
        kind = "python"
    elif isinstance(x, np.generic):
        kind = "numpy"
    elif isinstance(x, np.ndarray) or _is_jax_array(x):
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
    elif name in _PLAIN_DTYPES:
        a = a.astype(_PLAIN_DTYPES[name], copy=False)  # native byte order
    else:
        raise TypeError(f"save: {path} has dtype {a.dtype}, which fbp.io cannot store")
    entry = _entry_name(parts)
    leaves.append((entry, a))
    return {"kind": "leaf", "entry": entry, "dtype": name, "shape": list(a.shape), "as": kind}


def _write_zip(f, entries: list[tuple[str, np.ndarray]]) -> None:
    """Write ``entries`` as an uncompressed ``.npz`` (``name.npy`` members), as ``np.savez``."""
    with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, array in entries:
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_TIME)
            info.external_attr = 0o644 << 16
            with zf.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, array, allow_pickle=False)


_LIVE_LOCK = threading.Lock()
_LIVE: set[str] = set()  # this process's temporaries being written (in case flock is per process)


def _temp_pattern(base: str) -> re.Pattern:
    return re.compile(re.escape(f".{base}.{_TEMP_TAG}-") + r"[0-9a-f]{16}\.tmp")


def _create_temporary(directory: str, base: str, names: list[str]) -> tuple[int, str]:
    """Create, open and lock a new temporary file for target ``base``: ``(fd, path)``.

    Each name is added to ``names`` (and ``_LIVE``) before the file is created, so that the
    caller can remove it even if an exception (KeyboardInterrupt, SIGTERM) strikes between the
    file's creation and this function's return.
    """
    for _ in range(100):
        tmp = os.path.join(directory, f".{base}.{_TEMP_TAG}-{secrets.token_hex(8)}.tmp")
        with _LIVE_LOCK:
            _LIVE.add(tmp)
        names.append(tmp)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # umask applies
        except FileExistsError:  # another file by this name (odds 2**-64): not ours to remove
            names.remove(tmp)
            continue
        if fcntl is None:
            return fd, tmp
        try:
            # Blocks only while another save's cleanup, which opened the file between our open
            # and this lock, decides; if it removed the file, take a new name.
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # no locks here: then no other save can prove the file stale either
            return fd, tmp
        if os.fstat(fd).st_nlink > 0:
            return fd, tmp
        os.close(fd)
    raise OSError(f"save: could not create a temporary file in {directory!r}")


def _remove_stale_temporaries(directory: str, base: str) -> None:
    """Remove temporaries for target ``base`` that no live save holds (best effort, silent)."""
    if fcntl is None:
        return
    pattern = _temp_pattern(base)
    try:
        names = [n for n in os.listdir(directory) if pattern.fullmatch(n)]
    except OSError:
        return
    for name in names:
        tmp = os.path.join(directory, name)
        with _LIVE_LOCK:
            if tmp in _LIVE:
                continue
        with contextlib.suppress(OSError):
            _remove_if_unlocked(tmp)


def _remove_if_unlocked(tmp: str) -> None:
    # O_RDWR: where flock is emulated with POSIX locks (NFS), an exclusive lock needs write access.
    flags = os.O_RDWR | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    fd = os.open(tmp, flags)
    try:
        opened = os.fstat(fd)
        if not stat.S_ISREG(opened.st_mode):
            return
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError: a live save holds it
        now = os.stat(tmp, follow_symlinks=False)  # still the file we locked?
        if (now.st_dev, now.st_ino) == (opened.st_dev, opened.st_ino):
            os.unlink(tmp)
    finally:
        os.close(fd)


def _fsync_directory(directory: str) -> None:
    with contextlib.suppress(OSError, AttributeError):  # persist the rename (POSIX only)
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _write_atomically(path: str, entries: list[tuple[str, np.ndarray]]) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path)
    _remove_stale_temporaries(directory, base)
    names: list[str] = []  # the temporary files this save may have created
    try:
        fd, tmp = _create_temporary(directory, base, names)
        with os.fdopen(fd, "wb") as f:
            _write_zip(f, entries)
            f.flush()
            os.fsync(f.fileno())
            if fcntl is not None:  # rename while still holding the lock
                os.replace(tmp, path)
        if fcntl is None:  # Windows cannot rename an open file
            os.replace(tmp, path)
    except BaseException:
        for name in names:  # after os.replace, ``tmp`` is gone: nothing to remove
            with contextlib.suppress(OSError):
                os.unlink(name)
        raise
    finally:
        with _LIVE_LOCK:
            _LIVE.difference_update(names)
    _fsync_directory(directory)


class _Terminated(SystemExit):
    """Raised by a save's SIGTERM handler so that the save removes its temporary file.

    ``_SigtermGuard`` then terminates the process by SIGTERM; only if the process survives that
    (a thread blocking SIGTERM) does this exception leave ``save``: it exits with status 143.
    """

    def __init__(self):
        super().__init__(128 + signal.SIGTERM)


class _SigtermGuard:
    """During a save in the main thread, turn SIGTERM's default action into an exception.

    Installed only where SIGTERM has its default action (SIG_DFL): a program's own handler is
    left in place (if it raises, e.g. ``sys.exit``, the save's cleanup runs; if it returns, the
    save goes on) and so is SIG_IGN. On exit the default action is restored and, if SIGTERM
    arrived, re-delivered: the process terminates by SIGTERM as it would have, only after the
    temporary file is gone. Other threads cannot install signal handlers: a SIGTERM during their
    save leaves the temporary file to the next save's cleanup.
    """

    def __init__(self):
        self.installed = self.armed = self.received = False

    def __enter__(self):
        if threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGTERM"):
            with contextlib.suppress(ValueError):  # ValueError: not the main interpreter
                if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
                    signal.signal(signal.SIGTERM, self._handler)
                    self.installed = self.armed = True
        return self

    def _handler(self, signum, frame):
        self.received = True
        if self.armed:  # only once: a second SIGTERM must not interrupt the cleanup
            self.armed = False
            raise _Terminated

    def disarm(self):
        """Call as the last statement in the ``with`` block: a SIGTERM after it only waits for
        ``__exit__``, so ``_Terminated`` is only ever raised inside the block."""
        self.armed = False

    def __exit__(self, *exc_info):
        self.armed = False
        if not self.installed:
            return False
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if self.received:
            os.kill(os.getpid(), signal.SIGTERM)
            raise _Terminated  # only reached if this thread blocks SIGTERM
        return False


def save(path: str | os.PathLike, tree: PyTree) -> None:
    """Write ``tree`` to ``path`` atomically (see the module docstring for the format).

    The file is written exactly at ``path``; unlike ``np.savez`` no ``.npz`` is appended. The
    data goes to a temporary file beside it, is flushed and fsynced, then ``os.replace``-d onto
    ``path``; on any error, KeyboardInterrupt included, the temporary file is removed and an
    existing ``path`` is untouched. Called from the main thread while SIGTERM has its default
    action, a SIGTERM also removes the temporary file, then terminates the process by SIGTERM. A
    SIGTERM handler of the program's own is left in charge: if it raises (``sys.exit``), the
    temporary file is removed as for any exception; if it returns, the save goes on.
    Temporary files that killed saves left for the same ``path`` are removed first, unless a live
    save holds them. Raises TypeError for what cannot be stored, ValueError for a tree whose
    description exceeds 16 MiB.
    """
    path = os.fspath(path)
    leaves: list[tuple[str, np.ndarray]] = []
    tree_json = json.dumps(
        {"format": _FORMAT, "version": _VERSION, "tree": _describe(tree, "tree", [], leaves)}
    ).encode("utf-8")
    if len(tree_json) > _MAX_TREE_BYTES:
        raise ValueError(
            f"save: the tree's description takes {len(tree_json)} bytes, over fbp.io's limit of "
            f"{_MAX_TREE_BYTES}; save fewer, larger leaves"
        )
    entries = [(_TREE, np.frombuffer(tree_json, dtype=np.uint8)), *leaves]
    with _SigtermGuard() as guard:
        _write_atomically(path, entries)
        guard.disarm()


# ---------------------------------------------------------------------------------------- load

_FREE = object()  # stands for "no ``like``": rebuild the tree from the file's own description
_NO_PICKLES = "fbp.io refuses object (pickled) arrays, since unpickling can execute code"
_ZIP_ERRORS = (
    zipfile.BadZipFile,
    EOFError,
    OSError,
    ValueError,  # UnicodeDecodeError (entry names) and numpy's header errors too
    struct.error,
    NotImplementedError,  # zip features zipfile lacks
    RuntimeError,  # encrypted entries
    OverflowError,
    KeyError,
    IndexError,
)


def _why(e: BaseException) -> str:
    """A low-level error, for a message (without advice to allow pickles, as numpy's can give)."""
    text = str(e)
    return type(e).__name__ if "pickle" in text else f"{type(e).__name__}: {text}"


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


def _stored_dtype(name: str) -> np.dtype:
    """The dtype a leaf recorded as ``name`` has in its ``.npy`` entry."""
    if name in _BITS_DTYPES:
        return np.dtype(f"uint{8 * _BITS_DTYPES[name].itemsize}")
    return _PLAIN_DTYPES[name]


def _is_identifier(s) -> bool:
    return isinstance(s, str) and s.isidentifier() and not keyword.iskeyword(s)


class _Reader:
    """One ``load``: the open zip, the file's size, and the checks made before any allocation."""

    def __init__(self, f, path: str):
        self.path = path
        self.f = f
        self.zf: zipfile.ZipFile | None = None
        self.size = 0

    def error(self, problem: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: {problem}", self.path)

    # -- the zip ---------------------------------------------------------------------------------

    def open_zip(self) -> None:
        st = os.fstat(self.f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise self.error("not a regular file")
        self.size = st.st_size
        if self.size == 0:
            raise self.error("the file is empty (0 bytes), not an fbp checkpoint")
        head = self.f.read(8)
        self.f.seek(0)
        if head.startswith(b"\x93NUMPY"):
            raise self.error("the file holds a single .npy array, not an fbp checkpoint")
        try:
            self.zf = zipfile.ZipFile(self.f)
        except _ZIP_ERRORS as e:
            if not head.startswith(b"PK\x03\x04"):
                raise self.error("not a zip file, so not an fbp checkpoint") from e
            if isinstance(e, zipfile.BadZipFile) and "not a zip file" in str(e):
                raise self.error(
                    f"truncated: the zip archive's end (its central directory) is missing or "
                    f"damaged ({self.size} bytes)"
                ) from e
            raise self.error(f"damaged zip archive ({_why(e)})") from e

    def member(self, entry: str, where: str) -> zipfile.ZipInfo:
        """The zip member of ``entry``, checked to be stored plainly within the file."""
        info = self.zf.NameToInfo.get(f"{entry}.npy")
        if info is None:
            raise self.error(f"{where}: entry {entry!r} is missing (damaged checkpoint)")
        if info.flag_bits & 0x61:  # encrypted, patched data, strong encryption
            raise self.error(f"entry {entry!r} is encrypted or patched; fbp checkpoints are not")
        if info.compress_type != zipfile.ZIP_STORED:
            raise self.error(f"entry {entry!r} is compressed; fbp checkpoints are not")
        if info.compress_size != info.file_size or info.header_offset < 0:
            raise self.error(f"damaged zip directory: entry {entry!r} has inconsistent sizes")
        if info.header_offset + info.file_size > self.size:
            raise self.error(
                f"truncated: entry {entry!r} ({info.file_size} bytes) extends past the end of "
                f"the file ({self.size} bytes)"
            )
        return info

    def read_array(self, entry: str, info: zipfile.ZipInfo, check) -> np.ndarray:
        """Read a ``.npy`` entry. Before allocating: refuse object arrays, what ``check(dtype,
        shape)`` refuses (it returns a problem or None), and a size the entry cannot hold."""
        try:
            with self.zf.open(info) as m:
                try:
                    version = np.lib.format.read_magic(m)
                    if version == (1, 0):
                        shape, fortran, dtype = np.lib.format.read_array_header_1_0(m)
                    elif version == (2, 0):
                        shape, fortran, dtype = np.lib.format.read_array_header_2_0(m)
                    else:
                        raise ValueError(version)
                except (ValueError, TypeError, OverflowError, SyntaxError, RecursionError) as e:
                    raise self.error(f"entry {entry!r} is not a readable .npy array") from e
                if dtype.hasobject:
                    raise self.error(f"entry {entry!r} is an object array: {_NO_PICKLES}")
                problem = check(dtype, shape)
                if problem:
                    raise self.error(problem)
                nbytes = math.prod(shape) * dtype.itemsize
                if m.tell() + nbytes != info.file_size:
                    raise self.error(
                        f"entry {entry!r}: its .npy header declares {dtype.name} {shape} "
                        f"({nbytes} bytes) but it holds {info.file_size - m.tell()} bytes of data"
                    )
                out = np.empty(math.prod(shape), dtype)
                raw = out.view(np.uint8)
                done = 0
                while done < nbytes:
                    chunk = m.read(min(nbytes - done, _CHUNK))
                    if not chunk:
                        raise EOFError
                    raw[done : done + len(chunk)] = np.frombuffer(chunk, np.uint8)
                    done += len(chunk)
                m.read()  # at the entry's end: zipfile checks its CRC-32 (if not done already)
        except CheckpointError:
            raise
        except zipfile.BadZipFile as e:
            raise self.error(f"damaged zip entry {entry!r} ({_why(e)})") from e
        except EOFError as e:
            raise self.error(f"truncated: entry {entry!r} ends early") from e
        except _ZIP_ERRORS as e:
            raise self.error(f"damaged zip entry {entry!r} ({_why(e)})") from e
        a = out.reshape(shape, order="F" if fortran else "C")
        return a if a.dtype.isnative else a.astype(a.dtype.newbyteorder("="))

    # -- the tree description --------------------------------------------------------------------

    def header(self) -> dict:
        info = self.zf.NameToInfo.get(f"{_TREE}.npy")
        if info is None:
            raise self.error("not an fbp checkpoint: the zip has no __tree__ entry")
        info = self.member(_TREE, "tree")

        def check(dtype, shape):
            if dtype != np.uint8 or len(shape) != 1 or type(shape[0]) is not int:
                return "not an fbp checkpoint: the __tree__ entry is not a byte string"
            if shape[0] > _MAX_TREE_BYTES:
                return f"the __tree__ entry is {shape[0]} bytes, over the {_MAX_TREE_BYTES} limit"
            return None

        raw = self.read_array(_TREE, info, check)
        try:
            header = json.loads(raw.tobytes().decode("utf-8"))
        except UnicodeDecodeError as e:
            raise self.error("unreadable __tree__ entry: not UTF-8 text") from e
        except (ValueError, RecursionError) as e:
            raise self.error(f"unreadable __tree__ entry: not valid JSON ({e})") from e
        if not isinstance(header, dict) or header.get("format") != _FORMAT:
            raise self.error("not an fbp checkpoint: __tree__ is not an fbp.io tree description")
        version = header.get("version")
        if type(version) is not int or version not in (1, _VERSION):
            newer = (
                " (the file is from a newer fbp)" if type(version) is int and version > 2 else ""
            )
            raise self.error(
                f"unknown format version {version!r}: this fbp.io reads versions 1 and 2{newer}"
            )
        return header

    def check_node(self, node, path: str, version: int, leaves: list) -> None:
        """Validate the JSON description of ``node`` (so ``_build`` can trust it); collect its
        leaves as ``(node, path)``; normalise a leaf's entry name into ``node["entry"]``."""

        def bad(what: str) -> CheckpointError:
            return self.error(f"corrupt tree description at {path}: {what}")

        if not isinstance(node, dict):
            raise bad("a node is not a JSON object")
        kind = node.get("kind")
        if kind == "none":
            return
        if kind == "leaf":
            dtype, shape, as_ = node.get("dtype"), node.get("shape"), node.get("as")
            if not isinstance(dtype, str) or not (dtype in _PLAIN_DTYPES or dtype in _BITS_DTYPES):
                raise bad(f"unsupported dtype {dtype!r}")
            if not isinstance(shape, list) or len(shape) > _MAX_NDIM:
                raise bad(f"invalid shape {shape!r}")
            if not all(type(d) is int and d >= 0 for d in shape):
                raise bad(f"invalid shape {shape!r}")
            if as_ not in ("array", "numpy", "python") or (as_ != "array" and shape):
                raise bad(f"invalid leaf type {as_!r} for shape {shape!r}")
            if version == 1:
                index = node.get("index")
                if type(index) is not int or index < 0:
                    raise bad(f"invalid leaf index {index!r}")
                node["entry"] = f"leaf_{index}"
            elif not isinstance(node.get("entry"), str) or node["entry"] in ("", _TREE):
                raise bad(f"invalid entry name {node.get('entry')!r}")
            leaves.append((node, path))
            return
        if kind not in ("dict", "namedtuple", "list", "tuple"):
            raise bad(f"unknown node kind {kind!r}")
        children = node.get("children")
        if not isinstance(children, list):
            raise bad("no list of children")
        names = children
        if kind in ("dict", "namedtuple"):
            names = node.get("keys" if kind == "dict" else "fields")
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise bad(f"invalid {kind} names {names!r}")
            if len(names) != len(children) or len(set(names)) != len(names):
                raise bad(f"{kind} names {names!r} do not match its {len(children)} children")
            fields_ok = all(_is_identifier(n) and not n.startswith("_") for n in names)
            if kind == "namedtuple" and not (_is_identifier(node.get("name")) and fields_ok):
                raise bad(f"invalid NamedTuple {node.get('name')!r} with fields {names!r}")
        for child, p in zip(children, _child_paths(kind, names, path), strict=True):
            self.check_node(child, p, version, leaves)

    def check_leaves(self, leaves: list) -> None:
        """Before reading any leaf: each entry exists once, can hold what its leaf declares, and
        all of them together fit in the file."""
        seen: dict[str, str] = {}
        total = self.zf.NameToInfo[f"{_TREE}.npy"].file_size
        for node, path in leaves:
            entry = node["entry"]
            if entry in seen:
                raise self.error(
                    f"corrupt tree description: {seen[entry]} and {path} both name entry {entry!r}"
                )
            seen[entry] = path
            info = self.member(entry, path)
            declared = math.prod(node["shape"]) * _stored_dtype(node["dtype"]).itemsize
            if declared > info.file_size:
                raise self.error(
                    f"{path} declares a {node['dtype']} array of shape {tuple(node['shape'])} "
                    f"({declared} bytes) but its entry {entry!r} holds {info.file_size} bytes"
                )
            total += info.file_size
        if total > self.size:
            raise self.error(
                f"the entries declare {total} bytes in all, more than the file's {self.size} "
                "bytes (damaged or crafted file)"
            )

    # -- building the tree -----------------------------------------------------------------------

    def leaf(self, node: dict, path: str) -> np.ndarray:
        entry, name, shape = node["entry"], node["dtype"], tuple(node["shape"])
        want = _stored_dtype(name)

        def check(dtype, stored_shape):
            if dtype.newbyteorder("<") != want.newbyteorder("<") or stored_shape != shape:
                return (
                    f"{path}: entry {entry!r} holds a {dtype} array of shape {stored_shape} but "
                    f"the tree description records {want} {shape}: it does not match its "
                    "description (damaged or crafted file)"
                )
            return None

        a = self.read_array(entry, self.zf.NameToInfo[f"{entry}.npy"], check)
        return a.view(_BITS_DTYPES[name]) if name in _BITS_DTYPES else a

    def build(self, node: dict, like, path: str, dry: bool):
        """Rebuild ``node``, checking it against ``like`` unless ``like is _FREE``; with ``dry``
        only check (no leaf is read) and return None."""
        kind = node["kind"]
        if like is not _FREE and _file_signature(node) != (want := _signature(like)):
            raise self.error(
                f"{path} does not match: `like` has {_show(want)}, "
                f"the file has {_show(_file_signature(node))}"
            )
        if kind == "none" or (dry and kind == "leaf"):
            return None
        if kind == "leaf":
            a = self.leaf(node, path)
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
            found = dict(zip(names, zip(children, paths, strict=True), strict=True))
            keys = names if like is _FREE else list(like)  # like's key order
            out = {k: self.build(found[k][0], _sub(like, k), found[k][1], dry) for k in keys}
            return None if dry else out
        values = [
            self.build(c, _sub(like, i), p, dry)
            for i, (c, p) in enumerate(zip(children, paths, strict=True))
        ]
        if dry:
            return None
        if kind == "namedtuple":
            cls = _namedtuple(node["name"], tuple(names)) if like is _FREE else type(like)
            return cls(*values)
        return values if kind == "list" else tuple(values)

    def load(self, like) -> PyTree:
        self.open_zip()
        with self.zf:
            header = self.header()
            leaves: list = []
            root = ("tree", _FREE) if like is None else ("like", like)
            try:
                self.check_node(header.get("tree"), "tree", header["version"], leaves)
                self.check_leaves(leaves)
                self.build(header["tree"], root[1], root[0], dry=True)
                return self.build(header["tree"], root[1], root[0], dry=False)
            except RecursionError as e:
                raise self.error("corrupt tree description: nested too deeply") from e


def _sub(like, key):
    return _FREE if like is _FREE else like[key]


def load(path: str | os.PathLike, like: PyTree = None) -> PyTree:
    """Read a tree written by :func:`save` (format version 2, or version 1).

    Without ``like``: dicts, lists, tuples and None come back as such, NamedTuples as
    ``collections.namedtuple`` classes with the stored type name and fields, array leaves as
    numpy arrays (whether jax or numpy arrays were saved), scalars as the Python or numpy scalar
    that was saved.

    With ``like`` (a tree of arrays, ``jax.ShapeDtypeStruct``s or scalars, e.g. freshly
    initialised params and optimizer state): the file must have the same structure (dict keys,
    NamedTuple type names and fields, list and tuple lengths, None) and every leaf the same shape
    and dtype, else CheckpointError naming the first differing path, e.g.
    ``like['params'][1]['w']``; nothing is read before the whole structure has been checked. The
    result is built with ``like``'s container types; a leaf comes back as a jax array (placed
    with ``like``'s sharding) where ``like`` has a jax array or ShapeDtypeStruct, else as the
    numpy array or scalar type ``like`` has.

    Raises CheckpointError (a ValueError) for a file that is not a complete, undamaged fbp
    checkpoint or does not match ``like`` (see the module docstring: nothing in the file is
    executed and no array larger than the file is allocated), the usual OSError (e.g.
    FileNotFoundError) if ``path`` cannot be opened, TypeError for a ``like`` leaf that is not an
    array, ShapeDtypeStruct or scalar.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:  # FileNotFoundError, PermissionError, ...: about the path
        try:
            return _Reader(f, path).load(like)
        except CheckpointError:
            raise
        except OSError as e:  # reading failed once the file was open
            raise CheckpointError(f"{path}: read error ({_why(e)})", path) from e
