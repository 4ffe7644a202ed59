"""fit, make_step, evaluate, predict: correctness against hand-rolled loops, resumption, no retrace."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fbp
from fbp import datasets, losses, nn, optim, train
from fbp.core import Layer

CE = losses.softmax_cross_entropy


@pytest.fixture(scope="module")
def digits():
    X, y = datasets.load_digits(scale=True)
    return datasets.train_test_split(X, y, test_size=0.2, seed=0, stratify=y)


def mlp(hidden=32, out=10):
    return nn.serial(nn.Dense(hidden), nn.Relu, nn.Dense(out))


def init(net, in_dim, seed=0):
    return net.init(jax.random.key(seed), (in_dim,))[1]


def tree_equal(a, b):
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        x.dtype == y.dtype and np.array_equal(x, y)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def counting(layer: Layer) -> tuple[Layer, list]:
    """The same layer, counting how often its forward is traced (a Python side effect)."""
    traces = []

    def forward(params, x, *, key=None):
        traces.append(x.shape)
        return layer.forward(params, x, key=key)

    return layer._replace(forward=forward), traces


def test_digits_reaches_96_percent(digits):
    """The issue's setup: 80/20 split, 64-128-10 ReLU MLP, adam(1e-3), 30 epochs, batch 32."""
    Xtr, Xte, ytr, yte = digits
    net = mlp(128)
    params, _, history = train.fit(
        net, CE, optim.adam(1e-3), init(net, 64), (Xtr, ytr),
        epochs=30, batch_size=32, key=jax.random.key(1), metrics=["accuracy"],
        validation_data=(Xte, yte), verbose=0,
    )  # fmt: skip
    test = train.evaluate(net, CE, params, (Xte, yte), metrics=["accuracy"])
    assert test["accuracy"] >= 0.96
    assert history["val_accuracy"][-1] == pytest.approx(test["accuracy"])
    assert set(history) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert all(len(v) == 30 for v in history.values())
    assert history["loss"][-1] < 0.25 * history["loss"][0]


def test_one_epoch_equals_a_hand_rolled_loop_including_the_partial_batch():
    """shuffle=False, 10 examples, batch 4: steps on [0:4], [4:8] and the partial [8:10]."""
    net = mlp(8, 3)
    X = jax.random.normal(jax.random.key(0), (10, 5), jnp.float32)
    y = jax.random.randint(jax.random.key(1), (10,), 0, 3)
    params0 = init(net, 5)
    opt = optim.sgd(0.1, momentum=0.9)
    params, state, history = train.fit(
        net, CE, opt, params0, (X, y), epochs=1, batch_size=4, key=jax.random.key(2),
        shuffle=False, verbose=0,
    )  # fmt: skip
    p, s, losses_seen = params0, opt.init(params0), []
    for lo, hi in [(0, 4), (4, 8), (8, 10)]:
        value, grads = fbp.value_and_grad(net, CE)(p, X[lo:hi], y[lo:hi])
        p, s = opt.update(grads, s, p)
        losses_seen.append(float(value) * (hi - lo))
    assert int(state.count) == 3
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(p), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert history["loss"][0] == pytest.approx(sum(losses_seen) / 10, rel=1e-5)


def test_resumed_run_is_bit_identical(tmp_path):
    net = nn.serial(nn.Dense(16), nn.Relu, nn.Dropout(0.2), nn.Dense(10))
    X, y = datasets.load_digits(scale=True)
    X, y = X[:300], y[:300]
    params0, key, opt = init(net, 64), jax.random.key(7), optim.adam(1e-3)
    kw = dict(batch_size=32, key=key, verbose=0, metrics=["accuracy"])
    full_params, full_state, full_hist = train.fit(net, CE, opt, params0, (X, y), epochs=4, **kw)

    params, state, hist1 = train.fit(net, CE, opt, params0, (X, y), epochs=2, **kw)
    fbp.io.save(tmp_path / "ckpt.npz", {"params": params, "opt_state": state})
    like = {"params": params0, "opt_state": opt.init(params0)}
    ckpt = fbp.io.load(tmp_path / "ckpt.npz", like=like)
    params, state, hist2 = train.fit(
        net, CE, opt, ckpt["params"], (X, y), epochs=4, initial_epoch=2,
        opt_state=ckpt["opt_state"], **kw,
    )  # fmt: skip
    assert tree_equal(params, full_params)
    assert tree_equal(state, full_state)
    assert hist1["loss"] + hist2["loss"] == full_hist["loss"]


def test_second_fit_with_same_shapes_does_not_retrace_and_data_are_arguments():
    dense, traces = counting(nn.Dense(8))
    net = nn.serial(dense, nn.Relu, nn.Dense(3))
    X = jax.random.normal(jax.random.key(0), (50, 4), jnp.float32)
    y = jax.random.randint(jax.random.key(1), (50,), 0, 3)
    params = init(net, 4)
    kw = dict(epochs=2, batch_size=16, key=jax.random.key(2), verbose=0)
    opt = optim.sgd(0.1)
    p1, _, _ = train.fit(net, CE, opt, params, (X, y), **kw)
    n_traces = len(traces)
    assert n_traces > 0
    p2, _, _ = train.fit(net, CE, opt, params, (X + 1.0, y), **kw)
    assert len(traces) == n_traces  # new data, same shapes: the compiled epoch is reused
    assert not tree_equal(p1, p2)  # and the data really were read as arguments


def test_make_step_matches_value_and_grad_then_update():
    net, opt = mlp(8, 3), optim.adam(1e-2)
    X = jax.random.normal(jax.random.key(0), (6, 5), jnp.float32)
    y = jax.random.randint(jax.random.key(1), (6,), 0, 3)
    params = init(net, 5)
    value, grads = fbp.value_and_grad(net, CE)(params, X, y)
    want_params, want_state = opt.update(grads, opt.init(params), params)
    step = train.make_step(net, CE, opt)
    copy = jax.tree.map(jnp.array, params)  # the step donates its inputs
    got_params, got_state, got_value = step(copy, opt.init(params), X, y)
    np.testing.assert_allclose(got_value, value, rtol=1e-6)
    for a, b in zip(
        jax.tree.leaves((got_params, got_state)), jax.tree.leaves((want_params, want_state))
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_evaluate_and_predict_in_batches_match_the_whole_batch():
    net = mlp(8, 3)
    params = init(net, 5)
    X = jax.random.normal(jax.random.key(0), (23, 5), jnp.float32)
    y = jax.random.randint(jax.random.key(1), (23,), 0, 3)
    pred = net.apply(params, X)
    np.testing.assert_allclose(
        train.predict(net, params, X, batch_size=5), pred, rtol=1e-5, atol=1e-6
    )
    got = train.evaluate(net, CE, params, (X, y), batch_size=5, metrics=["accuracy"])
    assert got["loss"] == pytest.approx(float(CE(pred, y)), rel=1e-5)
    assert got["accuracy"] == pytest.approx(float(np.mean(np.argmax(pred, -1) == y)))


def test_early_stopping_stops_and_restores_the_best_params(digits):
    Xtr, Xte, ytr, yte = digits
    rng = np.random.default_rng(0)
    y_noise = rng.permutation(yte)  # validation labels unrelated to the inputs: val_loss climbs
    net = mlp(64)
    stop = train.EarlyStopping(monitor="val_loss", patience=2, restore_best=True)
    params, _, history = train.fit(
        net, CE, optim.adam(3e-3), init(net, 64), (Xtr, ytr), epochs=40, batch_size=32,
        key=jax.random.key(0), validation_data=(Xte, y_noise), early_stopping=stop, verbose=0,
    )  # fmt: skip
    n = len(history["val_loss"])
    best = int(np.argmin(history["val_loss"]))
    assert n < 40 and n == best + 1 + 2
    val = train.evaluate(net, CE, params, (Xte, y_noise))
    assert val["loss"] == pytest.approx(history["val_loss"][best], rel=1e-6)


def test_early_stopping_rejects_an_unlogged_monitor():
    net = mlp(4, 3)
    X, y = jnp.zeros((8, 5)), jnp.zeros((8,), jnp.int32)
    with pytest.raises(ValueError, match=r"val_accuracy.*not logged"):
        train.fit(
            net, CE, optim.sgd(0.1), init(net, 5), (X, y), epochs=1, key=jax.random.key(0),
            early_stopping=train.EarlyStopping(monitor="val_accuracy"), verbose=0,
        )  # fmt: skip


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_params():
    net = mlp(8, 3)
    X = jax.random.normal(jax.random.key(0), (32, 5), jnp.float32)
    y = jax.random.randint(jax.random.key(1), (32,), 0, 3)
    params = init(net, 5)
    with pytest.warns(RuntimeWarning, match="loss became nan.*lower learning rate"):
        out, _, history = train.fit(
            net, CE, optim.sgd(1e30), params, (X, y), epochs=5, batch_size=8,
            key=jax.random.key(2), verbose=0,
        )  # fmt: skip
    assert len(history.get("loss", [])) < 5
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(out))


def test_verbose_prints_one_line_per_epoch_and_zero_is_silent(capsys):
    net = mlp(4, 3)
    X = jax.random.normal(jax.random.key(0), (20, 5), jnp.float32)
    y = jax.random.randint(jax.random.key(1), (20,), 0, 3)
    kw = dict(epochs=2, batch_size=8, key=jax.random.key(0), metrics=["accuracy"])
    train.fit(
        net, CE, optim.sgd(0.1), init(net, 5), (X, y), verbose=1, validation_data=(X, y), **kw
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("Epoch 1/2") and lines[1].startswith("Epoch 2/2")
    for field in ["loss:", "accuracy:", "val_loss:", "val_accuracy:", "ms/step"]:
        assert field in lines[1]
    train.fit(net, CE, optim.sgd(0.1), init(net, 5), (X, y), verbose=0, **kw)
    assert capsys.readouterr().out == ""


def test_progress_bar_advances_during_a_long_epoch(capsys, monkeypatch):
    monkeypatch.setattr(train._Progress, "after", 0.0)  # treat every epoch as a long one
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)  # the bar is for terminals only
    net = mlp(4, 3)
    X = jax.random.normal(jax.random.key(0), (400, 5), jnp.float32)
    y = jax.random.randint(jax.random.key(1), (400,), 0, 3)
    train.fit(
        net, CE, optim.sgd(0.1), init(net, 5), (X, y), epochs=1, batch_size=4, key=jax.random.key(0)
    )
    out = capsys.readouterr().out
    updates = [part for part in out.split("\r") if "/100 [" in part]
    assert len(updates) >= 5  # 100 steps, a callback every 10 (the first one starts the clock)
    assert "100/100 [" in out and "Epoch 1/1" in out
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False)
    train.fit(
        net, CE, optim.sgd(0.1), init(net, 5), (X, y), epochs=1, batch_size=4, key=jax.random.key(0)
    )
    assert "[" not in capsys.readouterr().out  # piped output gets the epoch line only


def test_fit_rejects_bad_data_and_arguments():
    net = mlp(4, 3)
    params = init(net, 5)
    with pytest.raises(ValueError, match=r"same number of examples.*\(10, 5\).*\(9,\)"):
        train.fit(net, CE, optim.sgd(0.1), params, (jnp.zeros((10, 5)), jnp.zeros(9, jnp.int32)),
                  epochs=1, key=jax.random.key(0))  # fmt: skip
    with pytest.raises(ValueError, match="batch_size"):
        train.fit(net, CE, optim.sgd(0.1), params, (jnp.zeros((10, 5)), jnp.zeros(10, jnp.int32)),
                  epochs=1, batch_size=0, key=jax.random.key(0))  # fmt: skip


def test_resume_from_a_checkpoint_loaded_without_like(tmp_path):
    """io.load without ``like`` gives look-alike NamedTuples; fit accepts them as the real state."""
    net, opt = mlp(8, 3), optim.adam(1e-2)
    X = jax.random.normal(jax.random.key(0), (40, 5), jnp.float32)
    y = jax.random.randint(jax.random.key(1), (40,), 0, 3)
    kw = dict(batch_size=16, key=jax.random.key(2), verbose=0)
    params, state, _ = train.fit(net, CE, opt, init(net, 5), (X, y), epochs=1, **kw)
    fbp.io.save(tmp_path / "c.npz", {"params": params, "opt_state": state})
    plain = fbp.io.load(tmp_path / "c.npz")
    assert type(plain["opt_state"]) is not type(state)
    got = train.fit(net, CE, opt, plain["params"], (X, y), epochs=3, initial_epoch=1,
                    opt_state=plain["opt_state"], **kw)  # fmt: skip
    want = train.fit(net, CE, opt, params, (X, y), epochs=3, initial_epoch=1, opt_state=state, **kw)
    assert tree_equal(got[0], want[0]) and tree_equal(got[1], want[1])
    with pytest.raises(ValueError, match="opt_state does not fit"):
        train.fit(net, CE, optim.sgd(0.1, momentum=0.9), params, (X, y), epochs=1,
                  opt_state=plain["opt_state"], **kw)  # fmt: skip


def test_early_stopping_patience_counts_non_improving_epochs():
    net = mlp(8, 3)
    X = jax.random.normal(jax.random.key(0), (64, 5), jnp.float32)
    y = jax.random.randint(jax.random.key(1), (64,), 0, 3)

    def run(patience, monitor="loss", mode="auto"):
        stop = train.EarlyStopping(
            monitor=monitor, patience=patience, mode=mode, restore_best=False
        )
        return train.fit(net, CE, optim.sgd(0.05), init(net, 5), (X, y), epochs=6, batch_size=16,
                         key=jax.random.key(0), early_stopping=stop, verbose=0)[2]  # fmt: skip

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
        out, _, history = train.fit(net, CE, optim.sgd(1e39), init(net, 5), (X, y), epochs=3,
                                    batch_size=8, key=jax.random.key(2), verbose=0)  # fmt: skip
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(out))
    assert len(history.get("loss", [])) < 3


def test_batch_size_may_be_a_numpy_integer():
    net = mlp(4, 3)
    X, y = jnp.zeros((10, 5), jnp.float32), jnp.zeros((10,), jnp.int32)
    _, state, _ = train.fit(net, CE, optim.sgd(0.1), init(net, 5), (X, y), epochs=1,
                            batch_size=np.int64(4), key=jax.random.key(0), verbose=0)  # fmt: skip
    assert int(state.count) == 3
