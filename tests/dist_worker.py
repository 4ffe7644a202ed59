"""The subprocess side of tests/test_distributed.py: JAX's device count and jax.distributed must
be set up before JAX starts, so each configuration runs in a fresh process.

    python tests/dist_worker.py devices OUT.json
        starts JAX through ``python -m fbp train --devices 4`` (then one device for
        comparison), then measures, on the 4 CPU devices, every layer's and loss's gradients
        with the batch sharded against unsharded, fit/evaluate/predict on a mesh against one
        device, a resumed run against an uninterrupted one, and io.load(like=sharded).
    python tests/dist_worker.py process OUT_DIR CLI_ARGS...
        one process of a multi-process ``python -m fbp train``: records the params fit returns
        and whether it wrote the checkpoint, then loads process 0's checkpoint onto the mesh.

The worker measures; the test holds the tolerances.
"""

import contextlib
import io as std_io
import json
import sys

import jax
import numpy as np

from fbp import checkpoint, cli, train


def run_cli(argv: list[str]) -> str:
    out = std_io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(argv) == 0
    return out.getvalue()


def rel_err(a, b) -> float:
    """The largest difference over the leaves, each relative to its reference's scale, or to
    1e-3 of the largest reference value if that is larger: a leaf whose true value is 0 (the
    gradient of a bias right before BatchNorm) holds rounding noise in either computation."""
    pairs = [
        (np.asarray(x, np.float64), np.asarray(r, np.float64))
        for x, r in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    ]
    floor = 1e-3 * max((np.max(np.abs(r), initial=0.0) for _, r in pairs), default=0.0)
    return max(
        (
            float(np.max(np.abs(x - r), initial=0.0) / max(np.max(np.abs(r)), floor, 1e-300))
            for x, r in pairs
        ),
        default=0.0,
    )


def bits_equal(a, b) -> bool:
    return all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def meshes():
    from jax.sharding import AxisType

    for kind in (AxisType.Explicit, AxisType.Auto):
        yield kind.name, jax.make_mesh((4,), ("data",), axis_types=(kind,))


def layer_gradients() -> dict:
    """Gradients of two networks that hold every layer family (and of every loss) with the
    batch split over 4 devices, against the same computation on one device (float64)."""
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import fbp
    from fbp import losses, nn

    nets = {
        "conv2d": (
            nn.serial(
                nn.Conv2D(4, 3, padding="same"), nn.BatchNorm(), nn.Relu, nn.MaxPool2D(2),
                nn.AvgPool2D(2, strides=1, padding="same"), nn.Conv2D(4, 2, groups=2),
                nn.FanOut(2), nn.parallel(nn.GlobalAvgPool, nn.serial(nn.Flatten, nn.Dense(4))),
                nn.FanInConcat(), nn.LayerNorm(), nn.Tanh, nn.Dropout(0.3), nn.Dense(3),
            ),
            (6, 6, 2),
            losses.softmax_cross_entropy,
        ),
        "conv1d-masked": (
            nn.serial(
                nn.Conv1D(3, 2, dilation=2), nn.MaxPool1D(2), nn.AvgPool1D(2, padding="same"),
                nn.Flatten, nn.Dense(6), nn.residual(nn.serial(nn.Dense(6), nn.Elu())),
                nn.BatchNorm(), nn.Gelu, nn.FanOut(2),
                nn.parallel(nn.Dense(3), nn.serial(nn.Dense(3), nn.Softmax)), nn.FanInSum,
            ),
            (9, 2),
            losses.mse,
        ),
        "sequence-masked": (  # token ids (batch, time) and a (batch, time) mask
            nn.serial(
                nn.Embedding(7, 4), nn.PositionalEmbedding(6),
                nn.TransformerBlock(4, 2, 8, causal=True),
                nn.LSTM(5, return_sequences=True, weight_grads="after_scan"),
                nn.GRU(4, return_sequences=True), nn.SimpleRNN(3, weight_grads="in_scan"),
                nn.Dense(3),
            ),
            (6,),
            losses.softmax_cross_entropy,
        ),
    }  # fmt: skip
    batch = 8
    rng = np.random.default_rng(0)
    out = {}
    for name, (net, in_shape, loss) in nets.items():
        out_shape, params, state = net.init(jax.random.key(0), in_shape)
        params, state = jax.tree.map(lambda a: a.astype(jnp.float64), (params, state))
        x = (
            rng.integers(0, 7, (batch, *in_shape))
            if name.startswith("sequence")
            else rng.normal(size=(batch, *in_shape))
        )
        y = (
            rng.integers(0, 3, batch)
            if loss is losses.softmax_cross_entropy
            else rng.normal(size=(batch, *out_shape))
        )
        mask = np.arange(batch) < 6 if "masked" in name else None
        if name.startswith("sequence"):  # padding at the end of some sequences
            mask = np.arange(in_shape[0])[None, :] < rng.integers(2, 7, (batch, 1))
        f = jax.jit(fbp.value_and_grad(net, loss))
        ref = f(params, state, x, y, key=jax.random.key(1), mask=mask)
        for kind, mesh in meshes():
            split = NamedSharding(mesh, P("data"))
            xs, ys, ms = (None if a is None else jax.device_put(a, split) for a in (x, y, mask))
            ps = jax.device_put((params, state), NamedSharding(mesh, P()))
            with jax.set_mesh(mesh):
                got = f(*ps, xs, ys, key=jax.random.key(1), mask=ms)
            out[f"{name} {kind}"] = rel_err(got, ref)

    pred = rng.normal(size=(batch, 3))
    targets = {
        "mse": pred + rng.normal(size=pred.shape),
        "mae": pred + rng.normal(size=pred.shape),
        "huber": 2 * rng.normal(size=pred.shape),
        "sigmoid_bce": rng.uniform(size=pred.shape),
        "softmax_ce": rng.integers(0, 3, batch),
        "softmax_ce_smoothed": rng.integers(0, 3, batch),
    }
    table = {
        "mse": losses.mse,
        "mae": losses.mae,
        "huber": losses.huber(0.5),
        "sigmoid_bce": losses.sigmoid_binary_cross_entropy,
        "softmax_ce": losses.softmax_cross_entropy,
        "softmax_ce_smoothed": losses.softmax_cross_entropy_smoothed(0.1),
    }
    mask = np.arange(batch) % 3 != 0

    @jax.jit
    def all_losses(pred, targets, mask):
        return {k: (table[k].value_and_grad(pred, targets[k]),
                    table[k].value_and_grad(pred, targets[k], mask)) for k in table}  # fmt: skip

    ref = all_losses(pred, targets, mask)
    for kind, mesh in meshes():
        split = NamedSharding(mesh, P("data"))
        with jax.set_mesh(mesh):
            got = all_losses(*jax.device_put((pred, targets, mask), split))
        for k in table:
            out[f"loss {k} {kind}"] = rel_err(got[k], ref[k])
    return out


def training() -> dict:
    """fit, evaluate and predict on 4 devices (both mesh kinds) against one device; a resumed
    4-device run against the uninterrupted one; io.load(like=...) of sharded trees."""
    import tempfile

    import jax.numpy as jnp

    from fbp import datasets, io, losses, nn, optim

    X, y = datasets.load_digits(scale=True)  # 1797 examples: the last batch of 64 is padded
    cases = {
        "mlp float64": (nn.mlp([32, 10]), jnp.float64),
        # Tanh before BatchNorm: with Relu (or none), a bias before BatchNorm has a true
        # gradient of 0, rounding noise in any summation order, which Adam scales to whole steps
        "batchnorm float32": (
            nn.serial(nn.Dense(32), nn.Tanh, nn.BatchNorm(), nn.Dropout(0.1), nn.Dense(10)),
            jnp.float32,
        ),
    }
    loss, opt = losses.softmax_cross_entropy, optim.adam(1e-2)
    out = {}
    for name, (net, dtype) in cases.items():
        _, params, state = net.init(jax.random.key(0), (64,))
        params, state = jax.tree.map(lambda a, t=dtype: a.astype(t), (params, state))
        kw = dict(epochs=3, batch_size=64, key=jax.random.key(1), verbose=0, metrics=["accuracy"])
        ref = train.fit(net, loss, opt, params, state, (X, y), **kw)
        ref_eval = train.evaluate(net, loss, *ref[:2], (X, y), metrics=["accuracy"])
        ref_pred = train.predict(net, *ref[:2], X)
        for kind, mesh in meshes():
            got = train.fit(net, loss, opt, params, state, (X, y), mesh=mesh, **kw)
            out[f"fit {name} {kind}"] = max(rel_err(got[i], ref[i]) for i in (0, 1))
            out[f"history {name} {kind}"] = rel_err(got[3], ref[3])
            out[f"replicated {name} {kind}"] = all(
                a.sharding.is_fully_replicated and len(a.sharding.device_set) == 4
                for a in jax.tree.leaves(got[:3])
            )
            if dtype == jnp.float32:
                ev = train.evaluate(net, loss, *got[:2], (X, y), metrics=["accuracy"], mesh=mesh)
                out[f"evaluate {name} {kind}"] = rel_err(ev, ref_eval)
                out[f"predict {name} {kind}"] = rel_err(
                    train.predict(net, *got[:2], X, mesh=mesh), ref_pred
                )
            if kind == "Explicit" and dtype == jnp.float32:  # resume from a saved epoch 2
                first = train.fit(net, loss, opt, params, state, (X, y), mesh=mesh,
                                  **{**kw, "epochs": 2})  # fmt: skip
                with tempfile.TemporaryDirectory() as tmp:
                    io.save(f"{tmp}/epoch2.npz", first[:3])
                    loaded = io.load(f"{tmp}/epoch2.npz", like=first[:3])
                out["load keeps the shardings"] = all(
                    a.sharding == b.sharding
                    for a, b in zip(
                        jax.tree.leaves(loaded), jax.tree.leaves(first[:3]), strict=True
                    )
                )
                resumed = train.fit(net, loss, opt, *loaded[:2], (X, y), mesh=mesh,
                                    opt_state=loaded[2], initial_epoch=2, **kw)  # fmt: skip
                out["resumed bit-identical"] = bits_equal(resumed[:3], got[:3])
    for name, kw in (("batch 30", {"batch_size": 30}), ("axis", {"data_axis": "batch"})):
        try:
            train.fit(net, loss, opt, params, state, (X, y), epochs=1, key=jax.random.key(1),
                      mesh=mesh, verbose=0, **kw)  # fmt: skip
            out[f"error {name}"] = None
        except ValueError as e:
            out[f"error {name}"] = str(e)
    return out


def devices_main(path: str) -> None:
    argv = ["train", "--epochs", "3", "--quiet", "--no-compile-cache"]
    results = {
        "cli 4 devices": run_cli([*argv, "--devices", "4"]),  # JAX starts here, on 4 devices
        "device count": jax.device_count(),
        "cli 1 device": run_cli(argv),
    }
    jax.config.update("jax_enable_x64", True)  # the strict numerics of tests/conftest.py
    jax.config.update("jax_numpy_rank_promotion", "raise")
    jax.config.update("jax_numpy_dtype_promotion", "strict")
    results.update(layer_gradients())
    results.update(training())
    with open(path, "w") as f:
        json.dump(results, f, indent=1)


def process_main(out_dir: str, argv: list[str]) -> None:
    """One process of a multi-process ``train``; fit's results and checkpoint writes are
    recorded through the module attributes the command line calls."""
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from fbp import io

    fitted, saves = [], []
    real_fit, real_save = train.fit, checkpoint.save
    train.fit = lambda *a, **k: fitted.append(real_fit(*a, **k)) or fitted[-1]
    checkpoint.save = lambda *a: saves.append(a[0]) or real_save(*a)
    status = cli.main(argv)
    params, state, opt_state, _ = fitted[0]
    pid = jax.process_index()
    np.savez(f"{out_dir}/params{pid}.npz", *[np.asarray(p) for p in jax.tree.leaves(params)])
    multihost_utils.sync_global_devices("checkpoint written")  # process 0 wrote it
    path = argv[argv.index("--output") + 1]
    like = {**io.load(path), "params": params, "state": state, "opt_state": opt_state}
    loaded = io.load(path, like=like)
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    rows = np.zeros((jax.local_device_count(), 3), np.float32)  # this process's rows
    spread = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), rows)
    try:
        io.save(f"{out_dir}/spread{pid}.npz", {"x": spread})
        refused = None
    except ValueError as e:
        refused = str(e)
    result = {
        "refused a cross-process shard": refused,
        "status": status,
        "processes": jax.process_count(),
        "devices": jax.device_count(),
        "wrote checkpoint": bool(saves),
        "loaded equal": bits_equal(loaded["params"], params),
        "loaded on the mesh": all(
            a.sharding == b.sharding
            for a, b in zip(jax.tree.leaves(loaded["params"]), jax.tree.leaves(params), strict=True)
        ),
    }
    with open(f"{out_dir}/result{pid}.json", "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    if sys.argv[1] == "devices":
        devices_main(sys.argv[2])
    else:
        process_main(sys.argv[2], sys.argv[3:])
