"""Careless input, one row each: what a new user might pass, and the clear error it must get
(type and message fragment), or the right result. Every case of the reliability issue's list."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fbp import checkpoint, io, losses, nn, optim, train
from fbp.core import ParamsError

CE = losses.softmax_cross_entropy
NET = nn.mlp([8, 10])
_, PARAMS, STATE = NET.init(jax.random.key(0), (4,))
X = jax.random.normal(jax.random.key(1), (12, 4), jnp.float32)
Y = jnp.arange(12, dtype=jnp.int32) % 10


def fit(**kw):
    args = dict(epochs=1, key=jax.random.key(0), verbose=0)
    data = kw.pop("data", (X, Y))
    return train.fit(NET, CE, optim.sgd(0.1), PARAMS, STATE, data, **{**args, **kw})


def labels(*values):
    return jnp.asarray(np.resize(np.asarray(values), 12), jnp.int32)


def renamed_w():
    p = ({"W": PARAMS[0]["w"], "b": PARAMS[0]["b"]}, *PARAMS[1:])
    return NET.apply(p, STATE, X)


def bad_config(tmp_path, config_bytes):
    path = tmp_path / "c.npz"
    io.save(path, {"config": np.frombuffer(config_bytes, np.uint8), "params": PARAMS,
                   "state": STATE, "opt_state": (), "preprocess": {}})  # fmt: skip
    return checkpoint.load(path)


def random_file(tmp_path):
    (tmp_path / "r.npz").write_bytes(np.random.default_rng(0).bytes(300))
    return checkpoint.load(tmp_path / "r.npz")


def config(**kw):
    c = {"format": "fbp.checkpoint", "version": 2, "model": "mlp", "hidden": [8],
         "activation": "relu", "input_shape": [4], "outputs": 10}  # fmt: skip
    return json.dumps({**c, **kw}).encode()


BAD = [
    # labels out of range: never a silent zero loss
    ("fit-label-10-of-10", lambda tmp: fit(data=(X, labels(0, 10, 3))), ValueError,
     r"fit: y: label 10 at row 1 is out of range for 10 classes"),
    ("fit-label-minus-1", lambda tmp: fit(data=(X, labels(-1))), ValueError,
     r"label -1 at row 0 is out of range"),
    ("evaluate-all-labels-10", lambda tmp: train.evaluate(NET, CE, PARAMS, STATE, (X, labels(10))),
     ValueError, r"evaluate: y: label 10 at row 0 .* 12 of 12 labels"),
    ("fit-validation-labels", lambda tmp: fit(validation_data=(X, labels(11))), ValueError,
     r"fit \(validation_data\): y: label 11"),
    ("check_labels", lambda tmp: losses.check_labels(np.array([0, 3, 7]), 5), ValueError,
     r"label 7 at row 2 is out of range for 5 classes"),
    # fit's arguments
    ("fit-epochs-2.5", lambda tmp: fit(epochs=2.5), ValueError, r"fit: epochs must be an int >= 0"),
    ("fit-epochs-True", lambda tmp: fit(epochs=True), ValueError, r"epochs must be an int"),
    ("fit-batch-0", lambda tmp: fit(batch_size=0), ValueError, r"fit: batch_size must be an int >= 1"),
    ("fit-initial-epoch", lambda tmp: fit(epochs=2, initial_epoch=3), ValueError,
     r"initial_epoch <= epochs"),
    ("fit-backup-every-0", lambda tmp: fit(backup_every=0), ValueError, r"backup_every"),
    ("fit-empty", lambda tmp: fit(data=(X[:0], Y[:0])), ValueError, r"fit: the data set is empty"),
    ("fit-x-y-lengths", lambda tmp: fit(data=(X, Y[:5])), ValueError,
     r"same number of examples.*\(12, 4\).*\(5,\)"),
    ("evaluate-batch-0", lambda tmp: train.evaluate(NET, CE, PARAMS, STATE, (X, Y), batch_size=0),
     ValueError, r"evaluate: batch_size must be an int >= 1"),
    ("predict-batch-minus-1", lambda tmp: train.predict(NET, PARAMS, STATE, X, batch_size=-1),
     ValueError, r"predict: batch_size must be an int >= 1"),
    ("predict-batch-2.0", lambda tmp: train.predict(NET, PARAMS, STATE, X, batch_size=2.0),
     ValueError, r"batch_size must be an int"),
    # optimizers: wrong learning rates fail at construction, not inside fit
    ("adam-abc", lambda tmp: optim.adam("abc"), TypeError,
     r"adam: learning_rate must be a float or a schedule"),
    ("sgd-negative", lambda tmp: optim.sgd(-0.1), ValueError, r"finite number >= 0"),
    ("sgd-nan", lambda tmp: optim.sgd(float("nan")), ValueError, r"finite number >= 0"),
    ("adamw-decay-str", lambda tmp: optim.adamw(1e-3, weight_decay="x"), TypeError,
     r"weight_decay must be a float or a schedule"),
    # params that do not fit
    ("params-key-W", lambda tmp: renamed_w(), ParamsError,
     r"params\[0\] should be a dict with keys \['b', 'w'\], got a dict with keys \['W', 'b'\]"),
    # damaged training checkpoints: one exception type, naming the path
    ("checkpoint-random-bytes", lambda tmp: random_file(tmp), io.CheckpointError, r"r\.npz"),
    ("checkpoint-bad-json", lambda tmp: bad_config(tmp, b"{not json"), io.CheckpointError,
     r"config is not valid UTF-8 JSON"),
    ("checkpoint-unknown-model", lambda tmp: bad_config(tmp, config(model="rnn")),
     io.CheckpointError, r"does not describe a network.*unknown model 'rnn'"),
    ("checkpoint-config-missing-key", lambda tmp: bad_config(tmp, config(hidden=None)),
     io.CheckpointError, r"does not describe a network"),
    ("checkpoint-wrong-version", lambda tmp: bad_config(tmp, config(version=7)),
     io.CheckpointError, r"version 7"),
]  # fmt: skip


@pytest.mark.parametrize("make, error, message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_gets_a_clear_error(tmp_path, make, error, message):
    with pytest.raises(error, match=message) as info:
        make(tmp_path)
    assert "allow_pickle" not in str(info.value)


def test_the_right_results_where_there_is_no_error():
    # predict on an empty X: an empty array of the output's shape and dtype
    out = train.predict(NET, PARAMS, STATE, X[:0])
    assert out.shape == (0, 10) and out.dtype == jnp.float32
    # evaluate clamps a huge batch size as fit does
    big = train.evaluate(NET, CE, PARAMS, STATE, (X, Y), batch_size=10**9)
    assert big["loss"] == pytest.approx(float(CE(NET.apply(PARAMS, STATE, X), Y)), rel=1e-6)
    # epochs == initial_epoch trains nothing and says so by its empty history
    assert fit(epochs=0)[3] == {}


def test_the_bare_loss_under_jit_gives_an_out_of_range_label_zero_loss_as_documented():
    """What the docstring promises: no error is possible under jit; the row contributes 0."""
    logits = jnp.zeros((2, 3))
    value, grad = jax.jit(CE.value_and_grad)(logits, jnp.array([3, 0]))
    assert float(value) == pytest.approx(np.log(3) / 2, rel=1e-6)
    np.testing.assert_array_equal(grad[0], 0.0)
