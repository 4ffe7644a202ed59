"""Training: a jitted step, and ``fit``, which runs each epoch as one compiled program.

    step = make_step(net, loss, optimizer)     # jitted; params, state and opt_state donated
    params, state, opt_state, L = step(params, state, opt_state, x, y, key)

    params, state, opt_state, history = fit(net, loss, optimizer, params, state, (X, y),
                                            epochs=30, batch_size=32, key=jax.random.key(0))

An epoch of ``fit`` is one call of a jitted function: a ``lax.scan`` over the minibatches, each
gathered by index from the device-resident data, then forward, backward (both through
:func:`fbp.backprop.forward_backward`, the one place a step's gradients are computed) and the
optimizer update. The order of the examples is a permutation seeded by ``(key, epoch)``; the
last partial batch is padded and the padding masked out of the loss and of BatchNorm's
statistics, so every example is used once, the step is exactly that of the unpadded batch,
and no program is compiled for the odd batch size. The data are arguments, not constants, so
a second ``fit`` with the same shapes reuses the compiled epoch. Nothing syncs with the host
inside an epoch except an optional progress callback every 10% of the steps. Because
shuffling and Dropout keys depend only on ``(key, epoch, step)``, a run resumed at
``initial_epoch=k`` from the params, state and optimizer state saved after epoch ``k`` is
bit-identical to an uninterrupted run.

With ``mesh=`` (a ``jax.sharding.Mesh``, Auto or Explicit axes), ``fit``, ``evaluate`` and
``predict`` are data parallel: the data, params, state and optimizer state are replicated on
every device of the mesh, and each batch is split along ``data_axis``, so every device gathers
and trains on its slice of the global batch and XLA sums the gradients with an all-reduce
(inside each layer's ``dw = x^T dy``, the contraction over the sharded batch axis). The same
code runs on many processes (``jax.distributed``): every process passes the same data and key.

The compiled programs are ``jax.jit`` functions of this module with the network, loss,
optimizer and settings as static arguments: JAX's own cache holds them, keyed on those
objects and on the shapes and dtypes of the arrays. The module keeps no mutable state.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import numbers
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fbp import io
from fbp import metrics as metrics_lib
from fbp.backprop import forward_backward
from fbp.core import Array, Layer, Loss, Optimizer, PyTree
from fbp.losses import check_labels
from fbp.nn import output_shape

History = dict[str, list[float]]


def _train_step(net, loss, optimizer, params, state, opt_state, x, y, key, mask=None):
    """Forward, backward, update: ``(params, state, opt_state, loss_value, pred)``."""
    value, grads, state, pred = forward_backward(
        net, loss, params, state, x, y, key=key, train=True, mask=mask
    )
    params, opt_state = optimizer.update(grads, params, opt_state)
    return params, state, opt_state, value, pred


def make_step(net: Layer, loss: Loss, optimizer: Optimizer) -> Callable[..., tuple]:
    """Return a jitted ``step(params, state, opt_state, x, y, key=None) -> (params, state,
    opt_state, loss)``, one training step (``train=True``).

    ``params``, ``state`` and ``opt_state`` are donated, in the order they are returned: XLA
    writes the new values into their buffers, so do not use the arrays you passed in after the
    call. ``key`` feeds Dropout (required when the network has Dropout).
    """

    def step(params, state, opt_state, x, y, key=None):
        return _train_step(net, loss, optimizer, params, state, opt_state, x, y, key)[:4]

    return jax.jit(step, donate_argnums=(0, 1, 2))


class EarlyStopping(NamedTuple):
    """Stop when ``monitor`` has not improved by more than ``min_delta`` for ``patience`` epochs.

    ``mode`` is "min" or "max"; "auto" means "max" for names containing "acc", else "min".
    With ``restore_best=True``, ``fit`` returns the params, state and optimizer state of the
    best epoch.
    """

    monitor: str = "val_loss"
    patience: int = 5
    min_delta: float = 0.0
    mode: str = "auto"
    restore_best: bool = True


# ---------------------------------------------------------------------------------------------
# The compiled programs: jitted with their configuration static, so JAX's cache reuses them.

_T0 = time.perf_counter()  # the progress bar's clock origin (a constant)
_BAR_AFTER = 2.0  # seconds into an epoch before the progress bar shows


def _show_progress(done, total, started) -> None:
    """Host side of the in-epoch progress bar, called from inside the compiled epoch.

    Stateless: the epoch's start time comes in as an argument. Shown only on a terminal, once
    the epoch has run 2 s.
    """
    elapsed = time.perf_counter() - _T0 - float(started)
    done, total = int(done), max(int(total), 1)
    if elapsed < _BAR_AFTER or not sys.stdout.isatty():
        return
    eta = elapsed / max(done, 1) * (total - done)
    width = 30
    filled = width * done // total
    bar = "=" * max(filled - 1, 0) + (">" if filled < width else "=") + "." * (width - filled)
    sys.stdout.write(f"\r{done}/{total} [{bar}] - ETA {eta:.0f}s ")
    sys.stdout.flush()


def _per_example_sum(fn, pred, y, valid, dtype):
    """``sum_b valid_b * fn(pred[b:b+1], y[b:b+1])``: a batch-mean function, summed per example."""
    per_example = jax.vmap(lambda p, t: fn(p[None], t[None]))(pred, y)  # (batch,)
    per_example = per_example.astype(dtype)
    return jnp.sum(per_example if valid is None else jnp.where(valid, per_example, 0))


def _acc_dtype(params) -> jnp.dtype:
    """Sums of losses and metrics: float64 for float64 models, else float32."""
    dtype = _param_dtype(params)
    return jnp.dtype(jnp.float64 if dtype == jnp.float64 else jnp.float32)


def _shard(v: Array, sharding: NamedSharding | None) -> Array:
    """``v`` laid out as ``sharding`` says, inside a compiled program: ``reshard`` on a mesh
    with Explicit axes, ``with_sharding_constraint`` on Auto axes, ``v`` itself without one."""
    if sharding is None:
        return v
    if AxisType.Explicit in sharding.mesh.axis_types:
        return jax.sharding.reshard(v, sharding)
    return jax.lax.with_sharding_constraint(v, sharding)


def _rows(A: Array, idx: Array, split: NamedSharding | None) -> Array:
    """The batch ``A[idx]`` of device-resident data; with a mesh, split as ``split`` says: each
    device gathers its own slice of the batch from its copy of ``A``, no data moves."""
    if split is None:
        return A[idx]
    idx = _shard(idx, split)
    if AxisType.Explicit in split.mesh.axis_types:
        return A.at[idx].get(out_sharding=split)  # the gather's layout must be given there
    return _shard(A[idx], split)


@functools.partial(
    jax.jit,
    static_argnames=(
        "net", "loss", "optimizer", "batch_size", "metric_fns", "progress", "unroll", "split",
    ),
)  # fmt: skip
def _run_epoch(
    params, state, opt_state, X, y, order, key, epoch, started,
    *, net, loss, optimizer, batch_size, metric_fns, progress, unroll, split=None,
):  # fmt: skip
    """One epoch: ``(params, state, opt_state, stats)`` with ``stats = [loss, *metrics, 1.0 if
    every new param is finite else 0.0]``, the loss and metrics as means over the examples.

    ``order`` lists the examples of the epoch, padded by wrapping around to a whole number of
    batches; the padded rows of the last batch are masked out (loss, BatchNorm statistics,
    metrics). Masking, not a second program for the partial batch, keeps one step in the
    compiled epoch (half the compile time). ``split`` (a sharding, with a mesh) splits each
    batch over the devices; every device gathers its own rows from its copy of ``X``.
    """
    n, n_steps = X.shape[0], order.shape[0] // batch_size
    padded = n % batch_size != 0  # static: only then is any batch masked
    drop_key = jax.random.fold_in(key, epoch)
    every = max(n_steps // 10, 1)  # a progress callback every 10% (each costs ~0.5 ms)
    acc = _acc_dtype(params)

    def body(carry, i):
        params, state, opt_state, sums = carry
        idx = jax.lax.dynamic_slice_in_dim(order, i * batch_size, batch_size)
        valid = _shard(i * batch_size + jnp.arange(batch_size) < n, split) if padded else None
        x, t = _rows(X, idx, split), _rows(y, idx, split)  # (B, ...)
        params, state, opt_state, value, pred = _train_step(
            net, loss, optimizer, params, state, opt_state, x, t,
            jax.random.fold_in(drop_key, i), valid,
        )  # fmt: skip
        count = batch_size if valid is None else jnp.minimum(n - i * batch_size, batch_size)
        stats = [value.astype(acc) * jnp.asarray(count, acc)]  # masked mean times real rows
        stats += [_per_example_sum(f, pred, t, valid, acc) for _, f in metric_fns]
        if progress:
            jax.lax.cond(
                (i + 1) % every == 0,
                lambda: jax.debug.callback(_show_progress, i + 1, n_steps, started),
                lambda: None,
            )
        return (params, state, opt_state, sums + jnp.stack(stats)), None

    sums = jnp.zeros(1 + len(metric_fns), acc)
    (params, state, opt_state, sums), _ = jax.lax.scan(
        body, (params, state, opt_state, sums), jnp.arange(n_steps), unroll=unroll
    )
    finite = _all_finite(params)
    return params, state, opt_state, jnp.concatenate([sums / n, finite.astype(acc)[None]])


def _all_finite(tree: PyTree) -> Array:
    """Whether every entry of every leaf is finite: one test over the leaves of each dtype laid
    end to end (a copy of the params, once an epoch), where a test per leaf gives XLA two or
    three more kernels to compile per leaf."""
    by_dtype: dict = {}
    for leaf in jax.tree.leaves(tree):
        by_dtype.setdefault(jnp.dtype(leaf.dtype), []).append(jnp.ravel(leaf))
    tests = [jnp.all(jnp.isfinite(jnp.concatenate(v))) for v in by_dtype.values()]
    return jnp.all(jnp.stack(tests)) if tests else jnp.asarray(True)


def _epoch_order(seed: list[int], epoch: int, n: int, batch_size: int, shuffle: bool) -> Array:
    """The epoch's example order, a function of ``(key, epoch)`` only, padded by wrapping to a
    whole number of batches. Drawn on the host (numpy, ~1 ms for 60k), which spares every
    fit a compiled sort."""
    order = np.random.default_rng([*seed, epoch]).permutation(n) if shuffle else np.arange(n)
    order = np.resize(order, n + (-n) % batch_size)  # wraps around, also past n
    return jnp.asarray(order.astype(np.int32))


def _padded_batches(n: int, batch_size: int) -> tuple[Array, Array]:
    """Indices ``(steps, batch_size)`` covering ``range(n)`` in order, the last batch padded by
    wrapping around, and the mask that is False on the padding (as ``fit``'s last batch)."""
    steps = -(-n // batch_size)
    flat = jnp.arange(steps * batch_size)
    return (flat % n).reshape(steps, batch_size), (flat < n).reshape(steps, batch_size)


@functools.partial(jax.jit, static_argnames=("net", "loss", "batch_size", "metric_fns", "split"))
def _evaluate(params, state, X, y, *, net, loss, batch_size, metric_fns, split=None):
    acc = _acc_dtype(params)

    def body(total, batch):
        idx, valid = batch[0], _shard(batch[1], split)
        pred = net.apply(params, state, _rows(X, idx, split), train=False)
        t = _rows(y, idx, split)
        sums = [loss.value(pred, t, valid).astype(acc) * jnp.sum(valid).astype(acc)]
        sums += [_per_example_sum(f, pred, t, valid, acc) for _, f in metric_fns]
        return total + jnp.stack(sums), None

    total = jnp.zeros(1 + len(metric_fns), acc)
    total, _ = jax.lax.scan(body, total, _padded_batches(X.shape[0], batch_size))
    return total / X.shape[0]


@functools.partial(jax.jit, static_argnames=("net", "batch_size", "split"))
def _predict(params, state, X, *, net, batch_size, split=None):
    def body(carry, i):
        return carry, net.apply(params, state, _rows(X, i, split), train=False)

    idx, _ = _padded_batches(X.shape[0], batch_size)
    _, out = jax.lax.scan(body, 0, idx)  # (steps, batch_size, ...)
    if split is not None:  # gathered onto every device: a replicated result, as the params
        out = _shard(out, NamedSharding(split.mesh, P()))
    return out.reshape(-1, *out.shape[2:])[: X.shape[0]]  # drop the padding


# ---------------------------------------------------------------------------------------------
# Public API


def _param_dtype(params: PyTree):
    floats = [p.dtype for p in jax.tree.leaves(params) if jnp.issubdtype(p.dtype, jnp.floating)]
    return floats[0] if floats else None


def _as_input(X, params: PyTree, replicated: NamedSharding | None = None) -> Array:
    """Inputs on the device; floating inputs cast to the params' dtype, as Keras casts to the
    layer dtype (float64 numpy data meet float32 params as float32). A numpy array is cast on
    the host and moved with ``device_put`` (one copy, not two). With a mesh, on every device
    (``replicated``): see :func:`_replicate`."""
    dtype = _param_dtype(params)
    if dtype is not None and jnp.issubdtype(X.dtype, jnp.floating) and X.dtype != dtype:
        X = X.astype(dtype)
    return jax.device_put(X) if replicated is None else _replicate(X, replicated)


class _DataParallel(NamedTuple):
    """The two layouts of data-parallel training on a mesh: everything ``replicated`` (data,
    params, state, optimizer state) and each batch split along the data axis (``batch``)."""

    replicated: NamedSharding
    batch: NamedSharding
    devices: int  # along the data axis


def _data_parallel(
    where: str, mesh: Mesh | None, data_axis: str, batch_size: int | None = None
) -> _DataParallel | None:
    """The layouts for ``mesh`` (None without one); ValueError for a mesh without
    ``data_axis`` or a ``batch_size`` (when given) its devices do not divide."""
    if mesh is None:
        return None
    if not isinstance(mesh, Mesh):
        raise TypeError(
            f"{where}: mesh must be a jax.sharding.Mesh, e.g. jax.make_mesh((jax.device_count(),"
            f"), ('data',)), got {type(mesh).__name__}."
        )
    if data_axis not in mesh.axis_names:
        raise ValueError(
            f"{where}: the mesh has no axis {data_axis!r} (its axes: {mesh.axis_names}); pass "
            "data_axis= the name of the axis to split the batch along."
        )
    devices = mesh.shape[data_axis]
    if batch_size is not None and batch_size % devices:
        lo, hi = batch_size // devices * devices, -(-batch_size // devices) * devices
        raise ValueError(
            f"{where}: batch_size {batch_size} is not divisible by the {devices} devices of the "
            f"mesh's {data_axis!r} axis (each trains on an equal part of the batch); pass a "
            f"multiple of {devices}, e.g. {' or '.join(str(b) for b in (lo, hi) if b)}."
        )
    return _DataParallel(NamedSharding(mesh, P()), NamedSharding(mesh, P(data_axis)), devices)


def _using(mesh: Mesh | None):
    """``jax.set_mesh(mesh)`` for a compiled call (arrays a program creates, such as a step
    count, need it on Explicit axes); nothing without a mesh."""
    return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


def _batch_for(batch_size: int, dp: _DataParallel | None) -> int:
    """``batch_size`` rounded up to a multiple of the devices (padding fills the rest)."""
    return batch_size if dp is None else -(-batch_size // dp.devices) * dp.devices


def _replicate(tree: PyTree, replicated: NamedSharding) -> PyTree:
    """Every leaf of ``tree`` on every device of the mesh, as one global array.

    Host data (numpy) go through ``jax.make_array_from_process_local_data``: in a run of many
    processes each passes the same global array, which is also its part of a replicated one.
    jax arrays (params from ``init``, a previous ``fit``) are moved with ``device_put``."""

    def place(a):
        if isinstance(a, jax.Array):
            return jax.device_put(a, replicated)
        return jax.make_array_from_process_local_data(replicated, np.asarray(a))

    return jax.tree.map(place, tree)


@functools.partial(jax.jit, static_argnames=("optimizer",))
def _init_opt_state(params, *, optimizer):
    return optimizer.init(params)


def _conform_state(optimizer: Optimizer, params: PyTree, opt_state: PyTree | None) -> PyTree:
    """``opt_state`` rebuilt with the exact tree type ``optimizer.init(params)`` has.

    A state read back by ``fbp.io.load(path)`` without ``like`` holds equal leaves in look-alike
    NamedTuple classes, which ``lax.scan`` would reject as a different carry. Same leaf paths,
    shapes and dtypes are required; anything else is an error, never a reinterpretation.
    """
    if opt_state is None:  # one small program, not an eager op per leaf; cached by config
        return _init_opt_state(params, optimizer=optimizer)
    template = jax.eval_shape(optimizer.init, params)
    got = jax.tree_util.tree_flatten_with_path(opt_state)[0]
    want = jax.tree_util.tree_flatten_with_path(template)[0]
    describe = lambda pairs: [  # noqa: E731
        (jax.tree_util.keystr(p), tuple(np.shape(a)), jnp.result_type(a)) for p, a in pairs
    ]
    if describe(got) != describe(want):
        raise ValueError(
            f"fit: opt_state does not fit this optimizer and these params.\n"
            f"  expected {jax.tree.structure(template)}\n  got      {jax.tree.structure(opt_state)}\n"
            "Pass the state that this optimizer's init or update returned (restore a checkpoint "
            "with fbp.io.load(path, like=...) to check it)."
        )
    return jax.tree.unflatten(jax.tree.structure(template), [a for _, a in got])


def _check_int(where: str, name: str, value, minimum: int) -> int:
    """An int (numpy ints too, not bools or floats) of at least ``minimum``, else ValueError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{where}: {name} must be an int >= {minimum}, got {value!r}.")
    return int(value)


def _check_data(where: str, X, y) -> tuple[Any, Array]:
    """``X`` as an array (numpy stays numpy until :func:`_as_input`), ``y`` on the device."""
    X = X if isinstance(X, (np.ndarray, jax.Array)) else np.asarray(X)
    y = jnp.asarray(y)
    if X.ndim == 0 or y.ndim == 0 or X.shape[0] != y.shape[0]:
        raise ValueError(
            f"{where}: X and y need the same number of examples on axis 0, got X {X.shape} "
            f"and y {y.shape}."
        )
    if X.shape[0] == 0:
        raise ValueError(f"{where}: the data set is empty.")
    return X, y


def _check_labels(where: str, net: Layer, X, y) -> None:
    """Integer labels against the network's number of outputs, on the host, before compiling:
    labels of shape ``out[:-1]`` per example must lie in ``[0, out[-1])``."""
    if not jnp.issubdtype(y.dtype, jnp.integer):
        return
    out = output_shape(net, tuple(X.shape[1:]))
    if isinstance(out, tuple) and out and tuple(y.shape[1:]) == tuple(out[:-1]):
        check_labels(np.asarray(y), out[-1], f"{where}: y")


def evaluate(
    net: Layer,
    loss: Loss,
    params: PyTree,
    state: PyTree,
    data: tuple[Any, Any],
    *,
    batch_size: int = 256,
    metrics: Sequence[str | Callable] = (),
    mesh: Mesh | None = None,
    data_axis: str = "data",
) -> dict[str, float]:
    """Mean loss and metrics over ``data = (X, y)``, in evaluation mode (``train=False``: no
    Dropout, BatchNorm's running statistics), computed in batches of at most ``batch_size``.
    Integer labels out of the network's range raise ``ValueError`` before anything runs.
    ``mesh``: data parallel as in :func:`fit`, the batch rounded up to a multiple of the
    devices on ``data_axis`` (the padding is masked, so the result does not change)."""
    X, y = _check_data("evaluate", *data)
    batch_size = _check_int("evaluate", "batch_size", batch_size, 1)
    dp = _data_parallel("evaluate", mesh, data_axis)
    batch_size = _batch_for(min(batch_size, X.shape[0]), dp)
    _check_labels("evaluate", net, X, y)
    X = _as_input(X, params, dp and dp.replicated)
    if dp is not None:
        params, state, y = _replicate((params, state, y), dp.replicated)
    metric_fns = metrics_lib.resolve(metrics)
    with _using(mesh):
        values = _evaluate(
            params, state, X, y, net=net, loss=loss, batch_size=batch_size,
            metric_fns=metric_fns, split=dp and dp.batch,
        )  # fmt: skip
    names = ["loss"] + [name for name, _ in metric_fns]
    return dict(zip(names, np.asarray(values).tolist(), strict=True))


def predict(
    net: Layer,
    params: PyTree,
    state: PyTree,
    X: Any,
    *,
    batch_size: int = 256,
    mesh: Mesh | None = None,
    data_axis: str = "data",
) -> Array:
    """``net.apply(params, state, X)`` in evaluation mode, computed in batches of at most
    ``batch_size``. An empty ``X`` gives an empty array of the output's shape. ``mesh``: data
    parallel as in :func:`evaluate`; the predictions come back replicated on every device."""
    X = X if isinstance(X, (np.ndarray, jax.Array)) else np.asarray(X)
    batch_size = _check_int("predict", "batch_size", batch_size, 1)
    dp = _data_parallel("predict", mesh, data_axis)
    if X.ndim == 0:
        raise ValueError(f"predict: X needs a batch axis, got a scalar {X!r}.")
    X = _as_input(X, params, dp and dp.replicated)
    if dp is not None:
        params, state = _replicate((params, state), dp.replicated)
    if X.shape[0] == 0:
        example = jax.ShapeDtypeStruct((1, *X.shape[1:]), X.dtype)
        out = jax.eval_shape(lambda p, s, x: net.apply(p, s, x), params, state, example)
        return jnp.zeros((0, *out.shape[1:]), out.dtype)
    batch_size = _batch_for(min(batch_size, X.shape[0]), dp)
    with _using(mesh):
        return _predict(params, state, X, net=net, batch_size=batch_size, split=dp and dp.batch)


# ---------------------------------------------------------------------------------------------
# Backups: fit(..., backup_dir=...) resumes a killed run (Keras's BackupAndRestore)

_BACKUP_FILE = "backup.npz"
_BACKUP_FORMAT = "fbp.train backup"


def _backup_identity(net, loss, optimizer, X, y, batch_size, key, shuffle) -> dict:
    """What a backup must agree on to be resumed: the run, not its length (``epochs``)."""
    return {
        "network": net.name,
        "loss": loss.name,
        "optimizer": optimizer.name,
        "batch_size": batch_size,
        "shuffle": bool(shuffle),
        "key": np.asarray(jax.random.key_data(key)).ravel().tolist(),
        "data": [list(X.shape), str(X.dtype), list(y.shape), str(y.dtype)],
    }


def _describe_leaves(tree) -> list:
    return [
        (jax.tree_util.keystr(path), tuple(np.shape(a)), str(jnp.result_type(a)))
        for path, a in jax.tree_util.tree_flatten_with_path(tree)[0]
    ]


def _read_backup(path: str, identity: dict, params, state, optimizer) -> dict | None:
    """The backup at ``path`` if there is one: ``{"epoch", "params", "state", "opt_state",
    "history", "stopper"}``; ValueError if it is a backup of another run."""
    if not os.path.exists(path):
        return None
    raw = io.load(path)
    try:
        meta = json.loads(bytes(np.asarray(raw["meta"], np.uint8)).decode("utf-8"))
        assert meta.pop("format") == _BACKUP_FORMAT
    except (KeyError, TypeError, ValueError, AssertionError):
        raise io.CheckpointError(f"{path}: not a backup written by fbp.train.fit.") from None
    differ = [k for k in identity if meta.get(k) != identity[k]]
    if differ:
        shown = "; ".join(f"{k}: backup {meta.get(k)!r}, this run {identity[k]!r}" for k in differ)
        raise ValueError(
            f"fit: {path} is a backup of a different run ({shown}). Pass another backup_dir, "
            "or delete the backup to start afresh."
        )
    for name, mine in (("params", params), ("state", state)):
        if _describe_leaves(raw[name]) != _describe_leaves(mine):
            raise ValueError(
                f"fit: {path} holds {name} of another shape than this run's; pass another "
                "backup_dir, or delete the backup to start afresh."
            )

    def trees(p, s, o):  # the file's leaves in this run's tree types
        p = jax.tree.unflatten(jax.tree.structure(params), jax.tree.leaves(p))
        s = jax.tree.unflatten(jax.tree.structure(state), jax.tree.leaves(s))
        return p, s, _conform_state(optimizer, p, o)

    stopper = raw["stopper"]
    if stopper is not None and stopper["best_state"] is not None:
        stopper = {**stopper, "best_state": trees(*stopper["best_state"])}
    params, state, opt_state = trees(raw["params"], raw["state"], raw["opt_state"])
    return {
        "epoch": int(raw["epoch"]),
        "history": {k: np.asarray(v).tolist() for k, v in raw["history"].items()},
        "stopper": stopper,
        "params": params,
        "state": state,
        "opt_state": opt_state,
    }


def _write_backup(path, identity, epoch, params, state, opt_state, history, stopper) -> None:
    """Atomically (fbp.io.save), and from process 0 only in a multi-process run."""
    if jax.process_index() != 0:
        return
    meta = json.dumps({"format": _BACKUP_FORMAT, **identity}).encode("utf-8")
    io.save(
        path,
        {
            "meta": np.frombuffer(meta, np.uint8),
            "epoch": np.int64(epoch),
            "params": params,
            "state": state,
            "opt_state": opt_state,
            "history": {k: np.asarray(v, np.float64) for k, v in history.items()},
            "stopper": stopper.snapshot() if stopper else None,
        },
    )


def fit(
    net: Layer,
    loss: Loss,
    optimizer: Optimizer,
    params: PyTree,
    state: PyTree,
    data: tuple[Any, Any],
    *,
    epochs: int,
    batch_size: int = 32,
    key: jax.Array,
    opt_state: PyTree | None = None,
    initial_epoch: int = 0,
    validation_data: tuple[Any, Any] | None = None,
    metrics: Sequence[str | Callable] = (),
    verbose: int = 1,
    shuffle: bool = True,
    early_stopping: EarlyStopping | None = None,
    unroll: int = 1,
    backup_dir: str | os.PathLike | None = None,
    backup_every: int = 1,
    mesh: Mesh | None = None,
    data_axis: str = "data",
) -> tuple[PyTree, PyTree, PyTree, History]:
    """Train ``net`` on ``data = (X, y)`` for epochs ``initial_epoch .. epochs - 1``.

    As Keras's ``fit``: ``epochs`` is the index of the last epoch plus one, so resuming with
    ``initial_epoch=k`` runs ``epochs - k`` more. Returns ``(params, state, opt_state,
    history)``: ``state`` is the network's (BatchNorm's running statistics), ``history`` holds
    per-epoch lists: "loss", each metric (e.g. "accuracy"), and with ``validation_data``
    "val_loss" and "val_<metric>" (evaluation mode). Train loss and metrics are means over the
    epoch's examples, each example counted at the step that trained on it, accumulated in
    float64 for float64 models.

    The loss must be a mean over examples that honours a mask (every :mod:`fbp.losses` loss
    does): the last partial batch is padded to ``batch_size`` and its padding masked out.
    Integer labels are checked against the network's number of outputs first, on the host.

    ``key`` seeds shuffling (numpy, seeded by ``(key, e)``) and Dropout (``fold_in(key, e)``,
    then the step index) in epoch ``e``; nothing else is random. ``verbose=1`` prints one
    line per epoch (and a progress bar during epochs longer than 2 s on a terminal); ``0`` is
    silent. A non-finite loss stops training with a warning and returns the params from before
    that epoch. ``unroll`` is passed to ``lax.scan``.

    ``backup_dir`` (Keras's ``BackupAndRestore``): after every ``backup_every`` epochs, and
    after the last, the params, state, optimizer state, epoch, history and early-stopping
    bookkeeping are written atomically to ``backup_dir/backup.npz``. When that file exists at
    the start, ``fit`` resumes from it, so a killed run restarted with the same call ends with
    the same params, bit for bit, as a run never killed. A backup of another run (another
    network, loss, optimizer, batch size, key, shuffling or data shape) is refused with a
    ``ValueError``. The backup is deleted when ``fit`` returns normally.

    ``mesh`` (a ``jax.sharding.Mesh`` with an axis ``data_axis``, Auto or Explicit): data
    parallel training. The data, params, state and optimizer state are replicated on every
    device; each batch of ``batch_size`` (the global batch, which the devices on ``data_axis``
    must divide) is split along ``data_axis``; XLA sums the gradients (and BatchNorm's batch
    statistics) over the devices. The result equals the single-device run up to the order of
    floating-point sums. The returned trees are replicated global arrays. In a run of many
    processes (``jax.distributed``) every process calls ``fit`` with the same data and key,
    and ``backup_dir`` must be a directory every process sees; process 0 writes the backups.
    """
    X, y = _check_data("fit", *data)
    epochs = _check_int("fit", "epochs", epochs, 0)
    initial_epoch = _check_int("fit", "initial_epoch", initial_epoch, 0)
    batch_size = _check_int("fit", "batch_size", batch_size, 1)
    backup_every = _check_int("fit", "backup_every", backup_every, 1)
    if not initial_epoch <= epochs:
        raise ValueError(f"fit: need initial_epoch <= epochs, got {initial_epoch}, {epochs}.")
    dp = _data_parallel("fit", mesh, data_axis, batch_size)
    batch_size = min(batch_size, _batch_for(X.shape[0], dp))
    _check_labels("fit", net, X, y)
    X = _as_input(X, params, dp and dp.replicated)
    if dp is not None:
        y = _replicate(y, dp.replicated)
    metric_fns = metrics_lib.resolve(metrics)
    if validation_data is not None:
        X_val, y_val = _check_data("fit (validation_data)", *validation_data)
        _check_labels("fit (validation_data)", net, X_val, y_val)
        validation_data = (_as_input(X_val, params, dp and dp.replicated), y_val)
    history: History = {}
    train_names = ["loss"] + [name for name, _ in metric_fns]
    log_names = train_names + ([f"val_{name}" for name in train_names] if validation_data else [])
    stopper = _Stopper(early_stopping, log_names) if early_stopping else None
    backup = None
    if backup_dir is not None:
        os.makedirs(backup_dir, exist_ok=True)
        backup = os.path.join(os.fspath(backup_dir), _BACKUP_FILE)
        identity = _backup_identity(net, loss, optimizer, X, y, batch_size, key, shuffle)
        restored = _read_backup(backup, identity, params, state, optimizer)
        if restored is not None:
            params, state, opt_state = (restored[k] for k in ("params", "state", "opt_state"))
            initial_epoch, history = restored["epoch"], restored["history"]
            if stopper and restored["stopper"] is not None:
                stopper.restore(restored["stopper"])
            if verbose:
                print(f"Resuming from {backup} after epoch {initial_epoch}.", flush=True)
    if dp is not None:
        params, state = _replicate((params, state), dp.replicated)
    with _using(mesh):
        opt_state = _conform_state(optimizer, params, opt_state)
    if dp is not None:
        opt_state = _replicate(opt_state, dp.replicated)
    run_epoch = functools.partial(
        _run_epoch, net=net, loss=loss, optimizer=optimizer, batch_size=batch_size,
        metric_fns=metric_fns, progress=bool(verbose), unroll=int(unroll),
        split=dp and dp.batch,
    )  # fmt: skip
    seed = np.asarray(jax.random.key_data(key)).ravel().tolist()  # uint32 words of the key
    n_steps = math.ceil(X.shape[0] / batch_size)

    stopped = stopper is not None and stopper.stopped
    for epoch in range(initial_epoch, epochs):
        if stopped:
            break
        t0 = time.perf_counter()
        order = _epoch_order(seed, epoch, X.shape[0], batch_size, shuffle)
        started = np.float32(t0 - _T0)
        with _using(mesh):
            new_params, new_state, new_opt_state, stats = run_epoch(
                params, state, opt_state, X, y, order, key, epoch, started
            )
        *stats, params_finite = np.asarray(stats).tolist()  # the one host sync of the epoch
        if verbose and sys.stdout.isatty() and time.perf_counter() - t0 >= _BAR_AFTER:
            sys.stdout.write("\r" + " " * 60 + "\r")  # clear the progress bar
        logs = dict(zip(train_names, stats, strict=True))
        if not (np.isfinite(logs["loss"]) and params_finite):
            what = (
                f"loss became {logs['loss']}"
                if not np.isfinite(logs["loss"])
                else "params became non-finite"
            )
            warnings.warn(
                f"fit: the training {what} in epoch {epoch + 1}; stopping. "
                "The returned params are those from before this epoch. Try a lower learning "
                "rate, gradient clipping (fbp.optim.clip_by_global_norm), or check the data "
                "for NaN/inf.",
                RuntimeWarning,
                stacklevel=2,
            )
            break
        params, state, opt_state = new_params, new_state, new_opt_state
        if validation_data is not None:
            val = evaluate(net, loss, params, state, validation_data, metrics=metrics,
                           mesh=mesh, data_axis=data_axis)  # fmt: skip
            logs.update({f"val_{k}": v for k, v in val.items()})
        for k, v in logs.items():
            history.setdefault(k, []).append(v)
        if verbose:
            took = time.perf_counter() - t0
            shown = " - ".join(f"{k}: {v:.4f}" for k, v in logs.items())
            print(
                f"Epoch {epoch + 1}/{epochs} - {n_steps} steps - {took:.2f}s "
                f"({1e3 * took / n_steps:.1f}ms/step) - {shown}",
                flush=True,
            )
        stopped = bool(stopper and stopper.done(epoch, logs, (params, state, opt_state)))
        if backup and ((epoch + 1) % backup_every == 0 or epoch + 1 == epochs or stopped):
            _write_backup(backup, identity, epoch + 1, params, state, opt_state, history, stopper)
        if stopped and verbose:
            print(
                f"Early stopping: {stopper.cfg.monitor} has not improved for "
                f"{stopper.cfg.patience} epochs; best was epoch {stopper.best_epoch + 1} "
                f"({stopper.best:.4f}).",
                flush=True,
            )
    if stopper and stopper.cfg.restore_best and stopper.best_state is not None:
        params, state, opt_state = stopper.best_state
    if backup and jax.process_index() == 0 and os.path.exists(backup):
        os.remove(backup)  # as Keras's BackupAndRestore: a finished run leaves no backup
    return params, state, opt_state, history


class _Stopper:
    """Early-stopping bookkeeping for ``fit``: the best value of the monitored log, and patience."""

    def __init__(self, cfg: EarlyStopping, log_names: list[str]):
        if cfg.monitor not in log_names:
            raise ValueError(
                f"EarlyStopping: monitor {cfg.monitor!r} is not logged; fit logs {log_names}. "
                "Pass validation_data for val_* logs, or metrics=['accuracy'] for accuracy."
            )
        if not (isinstance(cfg.patience, int) and cfg.patience >= 0):
            raise ValueError(f"EarlyStopping: patience must be an int >= 0, got {cfg.patience!r}.")
        mode = cfg.mode if cfg.mode != "auto" else ("max" if "acc" in cfg.monitor else "min")
        if mode not in ("min", "max"):
            raise ValueError(
                f"EarlyStopping: mode must be 'min', 'max' or 'auto', got {cfg.mode!r}."
            )
        self.cfg, self.better = cfg, (np.less if mode == "min" else np.greater)
        self.min_delta = -cfg.min_delta if mode == "min" else cfg.min_delta
        self.best, self.best_epoch, self.best_state, self.wait = None, -1, None, 0
        self.stopped = False

    def done(self, epoch: int, logs: dict, trees: tuple) -> bool:
        value = logs[self.cfg.monitor]
        if self.best is None or self.better(value, self.best + self.min_delta):
            self.best, self.best_epoch, self.wait = value, epoch, 0
            if self.cfg.restore_best:
                self.best_state = trees
            return False
        self.wait += 1
        self.stopped = self.wait >= self.cfg.patience  # as Keras: patience non-improving epochs
        return self.stopped

    def snapshot(self) -> dict:
        """The bookkeeping, for a backup: plain numbers, and the best trees if kept."""
        return {
            "best": np.float64(np.nan if self.best is None else self.best),
            "best_epoch": np.int64(self.best_epoch),
            "wait": np.int64(self.wait),
            "stopped": np.bool_(self.stopped),
            "best_state": self.best_state,
        }

    def restore(self, snap: dict) -> None:
        best = float(snap["best"])
        self.best = None if np.isnan(best) else best
        self.best_epoch, self.wait = int(snap["best_epoch"]), int(snap["wait"])
        self.stopped = bool(snap["stopped"])
        self.best_state = snap["best_state"]
