"""fit, make_step, evaluate, predict: against hand-rolled loops (shuffling, Dropout keys and the
padded last batch with BatchNorm included), resumption, state, no retrace, bad input."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fbp
from fbp import datasets, losses, nn, optim, train
from fbp.core import Layer, ParamsError

CE = losses.softmax_cross_entropy


@pytest.fixture(scope="module")
def digits():
    X, y = datasets.load_digits(scale=True)
    return datasets.train_test_split(X, y, test_size=0.2, seed=0, stratify=y)


def mlp(hidden=32, out=10):
    return nn.mlp([hidden, out])


def init(net, in_dim, seed=0, dtype=jnp.float32):
    _, params, state = net.init(jax.random.key(seed), (in_dim,))
    return jax.tree.map(lambda a: a.astype(dtype), (params, state))


def tree_equal(a, b):
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        x.dtype == y.dtype and np.array_equal(x, y)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def assert_trees_close(a, b, rtol, atol=0.0):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


def counting(layer: Layer) -> tuple[Layer, list]:
    """The same layer, counting how often its forward is traced (a Python side effect)."""
    traces = []

    def forward(params, state, x, **kw):
        traces.append(x.shape)
        return layer.forward(params, state, x, **kw)

    return layer._replace(forward=forward), traces


def epoch_order(key, epoch, n):
    """fit's documented order: numpy's default_rng seeded by (key's words, epoch)."""
    seed = np.asarray(jax.random.key_data(key)).ravel().tolist()
    return np.random.default_rng([*seed, epoch]).permutation(n)


def test_digits_reaches_96_percent(digits):
    """The issue's setup: 80/20 split, 64-128-10 ReLU MLP, adam(1e-3), 30 epochs, batch 32."""
    Xtr, Xte, ytr, yte = digits
    net = mlp(128)
    params, state, _, history = train.fit(
        net, CE, optim.adam(1e-3), *init(net, 64), (Xtr, ytr),
        epochs=30, batch_size=32, key=jax.random.key(1), metrics=["accuracy"],
        validation_data=(Xte, yte), verbose=0,
    )  # fmt: skip
    test = train.evaluate(net, CE, params, state, (Xte, yte), metrics=["accuracy"])
    assert test["accuracy"] >= 0.96
    assert history["val_accuracy"][-1] == pytest.approx(test["accuracy"])
    assert set(history) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert all(len(v) == 30 for v in history.values())
    assert history["loss"][-1] < 0.25 * history["loss"][0]


RESIDUAL_BN = nn.serial(
    nn.Dense(128), nn.BatchNorm(), nn.Relu,
    nn.residual(nn.serial(nn.Dense(128), nn.BatchNorm(), nn.Relu)),
    nn.Dropout(0.2), nn.Dense(10),
)  # fmt: skip


def test_residual_mlp_with_batchnorm_and_dropout_reaches_97_percent_and_resumes_bit_identically(
    digits, tmp_path
):
    Xtr, Xte, ytr, yte = digits
    net, opt = RESIDUAL_BN, optim.adam(1e-3)
    params0, state0 = init(net, 64)
    kw = dict(batch_size=32, key=jax.random.key(1), verbose=0)
    params, state, opt_state, _ = train.fit(net, CE, opt, params0, state0, (Xtr, ytr),
                                            epochs=20, **kw)  # fmt: skip
    test = train.evaluate(net, CE, params, state, (Xte, yte), metrics=["accuracy"])
    assert test["accuracy"] >= 0.97, test
    # The running statistics moved away from their initial (0, 1).
    assert not np.allclose(state[1]["mean"], 0.0) and not np.allclose(state[1]["var"], 1.0)

    # Resume: 12 epochs, save through fbp.io, load, 8 more: the same bits as 20 in one go.
    p, s, o, _ = train.fit(net, CE, opt, params0, state0, (Xtr, ytr), epochs=12, **kw)
    fbp.io.save(tmp_path / "ckpt.npz", {"params": p, "state": s, "opt_state": o})
    like = {"params": params0, "state": state0, "opt_state": opt.init(params0)}
    ckpt = fbp.io.load(tmp_path / "ckpt.npz", like=like)
    p, s, o, _ = train.fit(net, CE, opt, ckpt["params"], ckpt["state"], (Xtr, ytr), epochs=20,
                           initial_epoch=12, opt_state=ckpt["opt_state"], **kw)  # fmt: skip
    assert tree_equal(p, params) and tree_equal(s, state) and tree_equal(o, opt_state)


def test_running_statistics_are_the_moving_average_of_the_batches_seen():
    """Replay fit's steps (its documented order, the padded last batch left out of the
    statistics): the running mean and variance of every BatchNorm equal a NumPy exponential
    moving average of the batch statistics of the BatchNorm inputs, step by step."""
    X, y = datasets.load_digits(scale=True)
    X, y = X[:150].astype(np.float64), y[:150]
    net, opt, key, B = RESIDUAL_BN, optim.sgd(0.05), jax.random.key(3), 32
    params0, state0 = init(net, 64, dtype=jnp.float64)
    params, state, _, _ = train.fit(net, CE, opt, params0, state0, (X, y), epochs=2,
                                    batch_size=B, key=key, verbose=0)  # fmt: skip

    dense0, bn0, _, res, *_ = net.layers
    inner_dense = res.layers[0].layers[0]
    p, s, o = params0, state0, opt.init(params0)
    ema = {"outer": [np.zeros(128), np.ones(128)], "inner": [np.zeros(128), np.ones(128)]}

    def update(which, h):  # h: (batch, 128) numpy, the BatchNorm's input
        mean, var = h.mean(0), h.var(0)
        ema[which][0] = 0.99 * ema[which][0] + 0.01 * mean
        ema[which][1] = 0.99 * ema[which][1] + 0.01 * var

    for epoch in range(2):
        order = epoch_order(key, epoch, len(X))
        for i in range(0, len(X), B):
            idx = order[i : i + B]
            x = jnp.asarray(X[idx])
            h0 = dense0.apply(p[0], s[0], x)
            update("outer", np.asarray(h0))
            h2 = nn.Relu.apply((), (), bn0.apply(p[1], s[1], h0, train=True))
            update("inner", np.asarray(inner_dense.apply(p[3][0], s[3][0], h2)))
            _, grads, s, _ = fbp.forward_backward(
                net, CE, p, s, x, jnp.asarray(y[idx]),
                key=jax.random.fold_in(jax.random.fold_in(key, epoch), i // B),
            )  # fmt: skip
            p, o = opt.update(grads, p, o)
    for got, want in [(state[1], ema["outer"]), (state[3][1], ema["inner"])]:
        np.testing.assert_allclose(got["mean"], want[0], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(got["var"], want[1], rtol=1e-10, atol=1e-12)
    assert_trees_close(params, p, rtol=1e-9, atol=1e-12)


def test_two_epochs_equal_a_hand_rolled_loop_with_shuffling_dropout_and_the_partial_batch():
    """10 examples, batch 4: per epoch, steps on order[0:4], order[4:8] and order[8:10] padded
    with order[0:2] under a mask, with the order and the Dropout keys of the documented
    derivation. A shuffle or a Dropout key that ignored the epoch would give other params."""
    net = nn.serial(nn.Dense(8), nn.BatchNorm(), nn.Relu, nn.Dropout(0.3), nn.Dense(3))
    X = jax.random.normal(jax.random.key(0), (10, 5), jnp.float64)
    y = jax.random.randint(jax.random.key(1), (10,), 0, 3)
    params0, state0 = init(net, 5, dtype=jnp.float64)
    opt, key = optim.sgd(0.1, momentum=0.9), jax.random.key(2)
    params, state, opt_state, history = train.fit(
        net, CE, opt, params0, state0, (X, y), epochs=2, batch_size=4, key=key, verbose=0,
    )  # fmt: skip
    p, s, o = params0, state0, opt.init(params0)
    for epoch in range(2):
        order = epoch_order(key, epoch, 10)
        padded, seen = np.concatenate([order, order[:2]]), 0.0
        for step in range(3):
            idx = padded[4 * step : 4 * step + 4]
            mask = jnp.asarray(4 * step + np.arange(4) < 10)
            k = jax.random.fold_in(jax.random.fold_in(key, epoch), step)
            value, grads, s, _ = fbp.forward_backward(net, CE, p, s, X[idx], y[idx], key=k,
                                                      mask=mask)  # fmt: skip
            p, o = opt.update(grads, p, o)
            seen += float(value) * int(mask.sum())
        assert history["loss"][epoch] == pytest.approx(seen / 10, rel=1e-12)
    assert int(opt_state.count) == 6
    assert_trees_close((params, state), (p, s), rtol=1e-12, atol=1e-14)


def test_padded_last_batch_with_batchnorm_equals_the_unpadded_step():
    """No Dropout, shuffle off: fit's masked, padded last batch is exactly the 2-example step."""
    net = nn.serial(nn.Dense(6), nn.BatchNorm(), nn.Tanh, nn.Dense(3))
    X = jax.random.normal(jax.random.key(0), (10, 5), jnp.float64)
    y = jax.random.randint(jax.random.key(1), (10,), 0, 3)
    params0, state0 = init(net, 5, dtype=jnp.float64)
    opt = optim.sgd(0.1, momentum=0.9)  # (Adam would magnify the rounding noise of the
    params, state, _, history = train.fit(  # zero gradient of the bias before BatchNorm)
        net, CE, opt, params0, state0, (X, y), epochs=1, batch_size=4, key=jax.random.key(2),
        shuffle=False, verbose=0,
    )  # fmt: skip
    p, s, o, total = params0, state0, opt.init(params0), 0.0
    for lo, hi in [(0, 4), (4, 8), (8, 10)]:
        (value, s), grads = fbp.value_and_grad(net, CE)(p, s, X[lo:hi], y[lo:hi])
        p, o = opt.update(grads, p, o)
        total += float(value) * (hi - lo)
    assert_trees_close((params, state), (p, s), rtol=1e-12, atol=1e-14)
    assert history["loss"][0] == pytest.approx(total / 10, rel=1e-13)


def test_history_of_a_float64_model_is_accumulated_in_float64():
    net = mlp(8, 3)
    X = jax.random.normal(jax.random.key(0), (9, 5), jnp.float64)
    y = jax.random.randint(jax.random.key(1), (9,), 0, 3)
    params0, state0 = init(net, 5, dtype=jnp.float64)
    _, _, _, history = train.fit(net, CE, optim.sgd(0.0), params0, state0, (X, y), epochs=1,
                                 batch_size=3, key=jax.random.key(0), verbose=0)  # fmt: skip
    want = float(CE(net.apply(params0, state0, X), y))  # lr 0: every step sees params0
    assert history["loss"][0] == pytest.approx(want, rel=1e-14)


def test_resumed_run_is_bit_identical(tmp_path):
    net = nn.serial(nn.Dense(16), nn.Relu, nn.Dropout(0.2), nn.Dense(10))
    X, y = datasets.load_digits(scale=True)
    X, y = X[:300], y[:300]
    (params0, state0), key, opt = init(net, 64), jax.random.key(7), optim.adam(1e-3)
    kw = dict(batch_size=32, key=key, verbose=0, metrics=["accuracy"])
    full = train.fit(net, CE, opt, params0, state0, (X, y), epochs=4, **kw)

    p, s, o, hist1 = train.fit(net, CE, opt, params0, state0, (X, y), epochs=2, **kw)
    fbp.io.save(tmp_path / "ckpt.npz", {"params": p, "state": s, "opt_state": o})
    like = {"params": params0, "state": state0, "opt_state": opt.init(params0)}
    ckpt = fbp.io.load(tmp_path / "ckpt.npz", like=like)
    p, s, o, hist2 = train.fit(
        net, CE, opt, ckpt["params"], ckpt["state"], (X, y), epochs=4, initial_epoch=2,
        opt_state=ckpt["opt_state"], **kw,
    )  # fmt: skip
    assert tree_equal(p, full[0]) and tree_equal(s, full[1]) and tree_equal(o, full[2])
    assert hist1["loss"] + hist2["loss"] == full[3]["loss"]


def test_second_fit_with_same_shapes_does_not_retrace_and_data_are_arguments():
    dense, traces = counting(nn.Dense(8))
    net = nn.serial(dense, nn.Relu, nn.Dense(3))
    X = jax.random.normal(jax.random.key(0), (50, 4), jnp.float32)
    y = jax.random.randint(jax.random.key(1), (50,), 0, 3)
    params, state = init(net, 4)
    kw = dict(epochs=2, batch_size=16, key=jax.random.key(2), verbose=0)
    opt = optim.sgd(0.1)
    p1, *_ = train.fit(net, CE, opt, params, state, (X, y), **kw)
    n_traces = len(traces)
    assert n_traces > 0
    p2, *_ = train.fit(net, CE, opt, params, state, (X + 1.0, y), **kw)
    assert len(traces) == n_traces  # new data, same shapes: the compiled epoch is reused
    assert not tree_equal(p1, p2)  # and the data really were read as arguments


def test_make_step_matches_value_and_grad_then_update():
    net, opt = nn.mlp([8, 3], norm="batch"), optim.sgd(0.1, momentum=0.9)
    X = jax.random.normal(jax.random.key(0), (6, 5), jnp.float32)
    y = jax.random.randint(jax.random.key(1), (6,), 0, 3)
    params, state = init(net, 5)
    (value, want_state), grads = fbp.value_and_grad(net, CE)(params, state, X, y)
    want_params, want_opt = opt.update(grads, params, opt.init(params))
    step = train.make_step(net, CE, opt)
    copy = lambda t: jax.tree.map(jnp.array, t)  # noqa: E731 (the step donates its inputs)
    got_params, got_state, got_opt, got_value = step(
        copy(params), copy(state), opt.init(params), X, y
    )
    np.testing.assert_allclose(got_value, value, rtol=1e-6)
    assert_trees_close((got_params, got_state, got_opt), (want_params, want_state, want_opt),
                       rtol=1e-5, atol=1e-7)  # fmt: skip


def test_adamw_weight_decay_never_touches_the_network_state():
    """The optimizer sees params only: one step with a huge weight decay moves BatchNorm's
    running statistics exactly as a step with no optimizer at all (lr 0) does."""
    net = nn.mlp([8, 3], norm="batch")
    X = jax.random.normal(jax.random.key(0), (6, 5), jnp.float32)
    y = jax.random.randint(jax.random.key(1), (6,), 0, 3)
    params, state = init(net, 5)
    out = {}
    for name, opt in [("adamw", optim.adamw(1e-1, weight_decay=10.0)), ("none", optim.sgd(0.0))]:
        step = train.make_step(net, CE, opt)
        p, s = jax.tree.map(jnp.array, (params, state))
        out[name] = step(p, s, opt.init(params), X, y)
    assert tree_equal(out["adamw"][1], out["none"][1])  # the state
    assert not tree_equal(out["adamw"][0], out["none"][0])  # while the params moved
    assert not tree_equal(out["none"][1], state)  # and the statistics did move


def test_evaluate_and_predict_in_batches_match_the_whole_batch():
    net = nn.mlp([8, 3], norm="batch")
    params, state = init(net, 5)
    state = (state[0], {"mean": jnp.full(8, 0.1, jnp.float32), "var": jnp.full(8, 2.0, jnp.float32)},
             (), state[3])  # fmt: skip
    X = jax.random.normal(jax.random.key(0), (23, 5), jnp.float32)
    y = jax.random.randint(jax.random.key(1), (23,), 0, 3)
    pred = net.apply(params, state, X)  # evaluation mode: the running statistics
    np.testing.assert_allclose(
        train.predict(net, params, state, X, batch_size=5), pred, rtol=1e-5, atol=1e-6
    )
    got = train.evaluate(net, CE, params, state, (X, y), batch_size=5, metrics=["accuracy"])
    assert got["loss"] == pytest.approx(float(CE(pred, y)), rel=1e-5)
    assert got["accuracy"] == pytest.approx(float(np.mean(np.argmax(pred, -1) == y)))


def test_params_that_do_not_fit_are_refused_by_every_entry_point():
    X = jnp.zeros((8, 64), jnp.float32)
    y = jnp.zeros((8,), jnp.int32)
    small = init(mlp(16, 5), 64)
    big = mlp(32, 10)
    match = r"layer 0 \(Dense\(32\)\): params\[0\]\['w'\] should have shape \(64, 32\)"
    with pytest.raises(ParamsError, match=match):
        train.fit(big, CE, optim.adam(), *small, (X, y), epochs=1, key=jax.random.key(0),
                  verbose=0)  # fmt: skip
    with pytest.raises(ParamsError, match=match):
        train.evaluate(big, CE, *small, (X, y))
    with pytest.raises(ParamsError, match=match):
        train.predict(big, *small, X)
    with pytest.raises(ParamsError, match=match):
        fbp.check.check_grads(big, CE, *small, X, y)
    with pytest.raises(ParamsError, match=match):
        train.make_step(big, CE, optim.sgd(0.1))(*small, optim.sgd(0.1).init(small[0]), X, y)


def test_early_stopping_stops_and_restores_the_best_params(digits):
    Xtr, Xte, ytr, yte = digits
    rng = np.random.default_rng(0)
    y_noise = rng.permutation(yte)  # validation labels unrelated to the inputs: val_loss climbs
    net = mlp(64)
    stop = train.EarlyStopping(monitor="val_loss", patience=2, restore_best=True)
    params, state, _, history = train.fit(
        net, CE, optim.adam(3e-3), *init(net, 64), (Xtr, ytr), epochs=40, batch_size=32,
        key=jax.random.key(0), validation_data=(Xte, y_noise), early_stopping=stop, verbose=0,
    )  # fmt: skip
    n = len(history["val_loss"])
    best = int(np.argmin(history["val_loss"]))
    assert n < 40 and n == best + 1 + 2
    val = train.evaluate(net, CE, params, state, (Xte, y_noise))
    assert val["loss"] == pytest.approx(history["val_loss"][best], rel=1e-6)


def test_early_stopping_rejects_an_unlogged_monitor():
    net = mlp(4, 3)
    X, y = jnp.zeros((8, 5), jnp.float32), jnp.zeros((8,), jnp.int32)
    with pytest.raises(ValueError, match=r"val_accuracy.*not logged"):
        train.fit(
            net, CE, optim.sgd(0.1), *init(net, 5), (X, y), epochs=1, key=jax.random.key(0),
            early_stopping=train.EarlyStopping(monitor="val_accuracy"), verbose=0,
        )  # fmt: skip


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_params():
    net = mlp(8, 3)
    X = jax.random.normal(jax.random.key(0), (32, 5), jnp.float32)
    y = jax.random.randint(jax.random.key(1), (32,), 0, 3)
    with pytest.warns(RuntimeWarning, match="loss became nan.*lower learning rate"):
        out, _, _, history = train.fit(
            net, CE, optim.sgd(1e30), *init(net, 5), (X, y), epochs=5, batch_size=8,
            key=jax.random.key(2), verbose=0,
        )  # fmt: skip
    assert len(history.get("loss", [])) < 5
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(out))


def test_verbose_prints_one_line_per_epoch_and_zero_is_silent(capsys):
    net = mlp(4, 3)
    X = jax.random.normal(jax.random.key(0), (20, 5), jnp.float32)
    y = jax.random.randint(jax.random.key(1), (20,), 0, 3)
    kw = dict(epochs=2, batch_size=8, key=jax.random.key(0), metrics=["accuracy"])
    train.fit(net, CE, optim.sgd(0.1), *init(net, 5), (X, y), verbose=1, validation_data=(X, y),
              **kw)  # fmt: skip
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("Epoch 1/2") and lines[1].startswith("Epoch 2/2")
    for field in ["loss:", "accuracy:", "val_loss:", "val_accuracy:", "ms/step"]:
        assert field in lines[1]
    train.fit(net, CE, optim.sgd(0.1), *init(net, 5), (X, y), verbose=0, **kw)
    assert capsys.readouterr().out == ""


def test_progress_bar_advances_during_a_long_epoch(capsys, monkeypatch):
    monkeypatch.setattr(train, "_BAR_AFTER", 0.0)  # treat every epoch as a long one
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)  # the bar is for terminals only
    net = mlp(4, 3)
    X = jax.random.normal(jax.random.key(0), (400, 5), jnp.float32)
    y = jax.random.randint(jax.random.key(1), (400,), 0, 3)
    kw = dict(epochs=1, batch_size=4, key=jax.random.key(0))
    train.fit(net, CE, optim.sgd(0.1), *init(net, 5), (X, y), **kw)
    out = capsys.readouterr().out
    updates = [part for part in out.split("\r") if "/100 [" in part]
    assert len(updates) >= 5  # 100 steps, a callback every 10
    assert "100/100 [" in out and "Epoch 1/1" in out
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False)
    train.fit(net, CE, optim.sgd(0.1), *init(net, 5), (X, y), **kw)
    assert "[" not in capsys.readouterr().out  # piped output gets the epoch line only


def test_fit_rejects_bad_data_and_arguments():
    net = mlp(4, 3)
    params, state = init(net, 5)
    X = jnp.zeros((10, 5), jnp.float32)
    with pytest.raises(ValueError, match=r"same number of examples.*\(10, 5\).*\(9,\)"):
        train.fit(net, CE, optim.sgd(0.1), params, state, (X, jnp.zeros(9, jnp.int32)),
                  epochs=1, key=jax.random.key(0))  # fmt: skip
    with pytest.raises(ValueError, match="batch_size"):
        train.fit(net, CE, optim.sgd(0.1), params, state, (X, jnp.zeros(10, jnp.int32)),
                  epochs=1, batch_size=0, key=jax.random.key(0))  # fmt: skip


def test_resume_from_a_checkpoint_loaded_without_like(tmp_path):
    """io.load without ``like`` gives look-alike NamedTuples; fit accepts them as the real state."""
    net, opt = mlp(8, 3), optim.adam(1e-2)
    X = jax.random.normal(jax.random.key(0), (40, 5), jnp.float32)
    y = jax.random.randint(jax.random.key(1), (40,), 0, 3)
    kw = dict(batch_size=16, key=jax.random.key(2), verbose=0)
    params, state, opt_state, _ = train.fit(net, CE, opt, *init(net, 5), (X, y), epochs=1, **kw)
    fbp.io.save(tmp_path / "c.npz", {"params": params, "state": state, "opt_state": opt_state})
    plain = fbp.io.load(tmp_path / "c.npz")
    assert type(plain["opt_state"]) is not type(opt_state)
    got = train.fit(net, CE, opt, plain["params"], plain["state"], (X, y), epochs=3,
                    initial_epoch=1, opt_state=plain["opt_state"], **kw)  # fmt: skip
    want = train.fit(net, CE, opt, params, state, (X, y), epochs=3, initial_epoch=1,
                     opt_state=opt_state, **kw)  # fmt: skip
    assert tree_equal(got[0], want[0]) and tree_equal(got[2], want[2])
    with pytest.raises(ValueError, match="opt_state does not fit"):
        train.fit(net, CE, optim.sgd(0.1, momentum=0.9), params, state, (X, y), epochs=1,
                  opt_state=plain["opt_state"], **kw)  # fmt: skip


def test_early_stopping_patience_counts_non_improving_epochs():
    net = mlp(8, 3)
    X = jax.random.normal(jax.random.key(0), (64, 5), jnp.float32)
    y = jax.random.randint(jax.random.key(1), (64,), 0, 3)

    def run(patience, monitor="loss", mode="auto"):
        stop = train.EarlyStopping(
            monitor=monitor, patience=patience, mode=mode, restore_best=False
        )
        return train.fit(net, CE, optim.sgd(0.05), *init(net, 5), (X, y), epochs=6,
                         batch_size=16, key=jax.random.key(0), early_stopping=stop,
                         verbose=0)[3]  # fmt: skip

    assert len(run(0)["loss"]) == 6  # the training loss improves every epoch: no stop
    # "max" on a falling loss: epoch 1 is the best, each later one is worse.
    assert len(run(0, mode="max")["loss"]) == 2
    assert len(run(2, mode="max")["loss"]) == 3
    with pytest.raises(ValueError, match="patience"):
        run(-1)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # the 1e39 step, on purpose
def test_non_finite_params_after_the_last_step_stop_training():
    """One step per epoch with a huge step: the loss seen was finite, the params are not."""
    net = mlp(4, 3)
    X = jax.random.normal(jax.random.key(0), (8, 5), jnp.float32)
    y = jax.random.randint(jax.random.key(1), (8,), 0, 3)
    with pytest.warns(RuntimeWarning, match="params became non-finite"):
        out, _, _, history = train.fit(net, CE, optim.sgd(1e39), *init(net, 5), (X, y), epochs=3,
                                       batch_size=8, key=jax.random.key(2), verbose=0)  # fmt: skip
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(out))
    assert len(history.get("loss", [])) < 3


@pytest.mark.parametrize("bad", [None, ("w", np.nan), ("w", -np.inf), ("b", np.inf), ("c", np.nan)])
def test_the_finiteness_test_sees_every_leaf_of_every_dtype(bad):
    """fit's test of the new params lays each dtype's leaves end to end: a non-finite entry in
    any leaf, of either dtype, is seen; finite trees (and an empty one) pass."""
    tree = {
        "w": np.ones((3, 2), np.float32),
        "b": np.zeros(2, np.float32),
        "c": (np.full(4, 1e300, np.float64),),  # finite in float64, not in float32
    }
    if bad is not None:
        leaf = tree[bad[0]][0] if bad[0] == "c" else tree[bad[0]]
        leaf.reshape(-1)[-1] = bad[1]
    assert bool(train._all_finite(jax.tree.map(jnp.asarray, tree))) is (bad is None)
    assert bool(train._all_finite(()))


def test_batch_size_may_be_a_numpy_integer():
    net = mlp(4, 3)
    X, y = jnp.zeros((10, 5), jnp.float32), jnp.zeros((10,), jnp.int32)
    *_, opt_state, _ = train.fit(net, CE, optim.sgd(0.1), *init(net, 5), (X, y), epochs=1,
                                 batch_size=np.int64(4), key=jax.random.key(0),
                                 verbose=0)  # fmt: skip
    assert int(opt_state.count) == 3


# ---------------------------------------------------------------- backups (BackupAndRestore)


def test_a_run_interrupted_after_a_backup_resumes_to_the_same_bits(tmp_path, monkeypatch, capsys):
    net = nn.serial(nn.Dense(16), nn.BatchNorm(), nn.Relu, nn.Dropout(0.2), nn.Dense(10))
    X, y = datasets.load_digits(scale=True)
    X, y = X[:200], y[:200]
    (params0, state0), opt = init(net, 64), optim.adam(1e-3)
    stop = train.EarlyStopping("loss", patience=50)
    kw = dict(epochs=5, batch_size=32, key=jax.random.key(3), verbose=0, metrics=["accuracy"],
              early_stopping=stop)  # fmt: skip
    want = train.fit(net, CE, opt, params0, state0, (X, y), **kw)

    write = train._write_backup

    def write_then_die(path, identity, epoch, *args):
        write(path, identity, epoch, *args)
        if epoch == 2:
            raise KeyboardInterrupt  # as if killed right after the backup of epoch 2

    monkeypatch.setattr(train, "_write_backup", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        train.fit(net, CE, opt, params0, state0, (X, y), backup_dir=tmp_path, **kw)
    assert (tmp_path / "backup.npz").exists()
    monkeypatch.setattr(train, "_write_backup", write)
    capsys.readouterr()
    got = train.fit(
        net, CE, opt, params0, state0, (X, y), backup_dir=tmp_path, **{**kw, "verbose": 1}
    )
    out = capsys.readouterr().out
    assert "after epoch 2" in out and "Epoch 3/5" in out and "Epoch 2/5" not in out  # resumed
    assert tree_equal(got[:3], want[:3])
    assert got[3] == want[3]  # the history of the epochs before the interruption is restored
    assert not (tmp_path / "backup.npz").exists()  # removed once the run is complete


def test_a_backup_of_another_run_is_refused(tmp_path, monkeypatch):
    X = jax.random.normal(jax.random.key(0), (40, 5), jnp.float32)
    y = jax.random.randint(jax.random.key(1), (40,), 0, 3)
    write = train._write_backup

    def write_then_die(*args):
        write(*args)
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "_write_backup", write_then_die)
    net, kw = mlp(8, 3), dict(epochs=3, key=jax.random.key(2), verbose=0, backup_dir=tmp_path)
    with pytest.raises(KeyboardInterrupt):
        train.fit(net, CE, optim.sgd(0.1), *init(net, 5), (X, y), **kw)
    monkeypatch.setattr(train, "_write_backup", write)
    other = nn.mlp([8, 3], "tanh")
    with pytest.raises(ValueError, match=r"backup of a different run \(network: backup 'serial"):
        train.fit(other, CE, optim.sgd(0.1), *init(other, 5), (X, y), **kw)
    with pytest.raises(ValueError, match=r"optimizer: backup 'sgd\(0.1\)', this run 'adam"):
        train.fit(net, CE, optim.adam(0.1), *init(net, 5), (X, y), **kw)
    wider = mlp(9, 3)
    with pytest.raises(ValueError, match="network"):
        train.fit(wider, CE, optim.sgd(0.1), *init(wider, 5), (X, y), **kw)


COMPILES = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, duration, **kw: (
        COMPILES.append(event) if event == "/jax/core/compile/backend_compile_duration" else None
    )
)


def test_a_second_fit_with_an_equal_configuration_compiles_nothing():
    """Network, loss and optimizer built anew, equal in configuration: fit reuses every
    compiled program (they are keyed by structure, not identity)."""
    X = jax.random.normal(jax.random.key(0), (50, 4), jnp.float32)
    y = jax.random.randint(jax.random.key(1), (50,), 0, 3)

    def run():
        net = nn.mlp([8, 3], norm="batch", dropout=0.1)
        params, state = init(net, 4)
        return train.fit(net, losses.softmax_cross_entropy,
                         optim.adam(1e-3), params, state, (X, y), epochs=2, batch_size=16,
                         key=jax.random.key(2), verbose=0, metrics=["accuracy"],
                         validation_data=(X, y))  # fmt: skip

    run()
    before = len(COMPILES)
    run()
    assert len(COMPILES) == before
    assert nn.mlp([8, 3]) != nn.mlp([8, 4]) and optim.adam(1e-3) != optim.adam(1e-2)
