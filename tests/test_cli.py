"""``python -m fbp``: train on each data set, checkpoints, check's exit status, ``--help``.

Most tests call ``fbp.cli.main`` in-process (under conftest's strict numerics), which is much
faster than a subprocess per case; one subprocess checks the ``python -m fbp`` entry point.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fbp import checkpoint, cli, datasets, io, metrics, nn, optim
from fbp.core import Layer


@pytest.fixture(autouse=True)
def _no_persistent_cache_in_process(monkeypatch):
    """In-process runs must not switch on JAX's persistent cache for the rest of the tests; a
    subprocess test below checks the real thing."""
    monkeypatch.setattr(cli, "enable_compile_cache", lambda directory: None)


def _number(pattern: str, text: str) -> float:
    match = re.search(pattern, text)
    assert match, f"no match for {pattern!r} in:\n{text}"
    return float(match.group(1))


# ---------------------------------------------------------------------------------- train


@pytest.mark.parametrize(
    "data, extra, pattern, lo, hi",
    [
        # digits at the defaults but 2 epochs; a run at 30 epochs reaches ~0.97
        ("digits", [], r"test accuracy: ([0-9.]+)", 0.8, 1.0),
        ("mnist5k", ["--hidden", "32"], r"test accuracy: ([0-9.]+)", 0.7, 1.0),
        ("breast_cancer", [], r"test accuracy: ([0-9.]+)", 0.85, 1.0),
        # the target's variance is ~5900: predicting the mean scores about that
        ("diabetes", [], r"test mse: ([0-9.]+)", 0.0, 4500.0),
    ],
)
def test_train_each_data_set_reports_a_sensible_test_metric(capsys, data, extra, pattern, lo, hi):
    assert cli.main(["train", "--data", data, "--epochs", "2", "--quiet", *extra]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1, f"--quiet should print only the test line, got:\n{out}"
    assert out.startswith("test loss: ")
    assert lo <= _number(pattern, out) <= hi


def test_train_verbose_prints_the_setup_and_one_line_per_epoch(capsys):
    args = ["train", "--data", "breast_cancer", "--epochs", "3", "--optimizer", "sgd"]
    assert cli.main([*args, "--hidden", "8,4", "--activation", "tanh", "--lr", "0.05"]) == 0
    out = capsys.readouterr().out
    assert "data: breast_cancer" in out and "455 train, 114 test" in out
    assert "serial(Dense(8), Tanh, Dense(4), Tanh, Dense(1))" in out
    assert "total params: 289" in out  # the summary: 30*8+8 + 8*4+4 + 4*1+1
    assert "sigmoid_binary_cross_entropy" in out and "sgd(lr=0.05)" in out
    assert [f"Epoch {e}/3" in out for e in (1, 2, 3)] == [True] * 3
    assert re.search(r"^test loss: [0-9.]+ - test accuracy: [0-9.]+$", out, re.MULTILINE)


def test_train_output_writes_a_checkpoint_that_loads_back(capsys, tmp_path):
    path = tmp_path / "digits.npz"
    argv = ["train", "--epochs", "1", "--hidden", "16,8", "--activation", "gelu"]
    argv += ["--optimizer", "momentum", "--seed", "3", "--test-size", "0.25"]
    assert cli.main([*argv, "--quiet", "--output", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"saved checkpoint to {path}" in out
    printed_acc = _number(r"test accuracy: ([0-9.]+)", out)

    # The raw file: a dict with config (JSON bytes), params, state, opt_state, preprocess.
    raw = io.load(path)
    assert set(raw) == {"config", "params", "state", "opt_state", "preprocess"}
    config = json.loads(bytes(raw["config"]).decode("utf-8"))
    assert config["format"] == "fbp.checkpoint" and config["model"] == "mlp"
    assert config["data"] == "digits" and config["hidden"] == [16, 8]
    assert config["activation"] == "gelu" and config["optimizer"] == "momentum"
    assert config["lr"] == 0.01 and config["seed"] == 3 and config["test_size"] == 0.25
    assert config["input_shape"] == [64] and config["outputs"] == 10
    assert config["test"]["accuracy"] == pytest.approx(printed_acc, abs=5e-5)

    # Structure, shapes and dtypes match a fresh init and optimizer state exactly.
    net = nn.mlp([16, 8, 10], "gelu")
    _, params, state = net.init(jax.random.key(0), (64,))
    opt_state = optim.sgd(0.01, momentum=0.9).init(params)
    like = {"params": params, "state": state, "opt_state": opt_state}
    like["config"], like["preprocess"] = raw["config"], raw["preprocess"]
    loaded = io.load(path, like=like)
    assert jax.tree.structure(loaded["params"]) == jax.tree.structure(params)
    assert int(loaded["opt_state"].count) == 43  # 1347 train examples: ceil(1347 / 32) steps

    # checkpoint.load rebuilds the net; the documented preprocessing reproduces the test number.
    net2, ck = checkpoint.load(path)
    assert net2.name == net.name and ck.config == config
    X, y = datasets.load_digits()
    _, X_test, _, y_test = datasets.train_test_split(X, y, test_size=0.25, seed=3, stratify=y)
    pre = ck.preprocess
    np.testing.assert_array_equal(pre["x_shift"], 0.0)
    np.testing.assert_array_equal(pre["x_scale"], 16.0)
    x = ((X_test - pre["x_shift"]) / pre["x_scale"]).astype(np.float32)
    params = jax.tree.map(jnp.asarray, ck.params)
    pred = net2.apply(params, ck.state, jnp.asarray(x))
    acc = float(metrics.accuracy(pred, jnp.asarray(y_test)))
    assert acc == pytest.approx(printed_acc, abs=5e-5)


def test_checkpoint_load_refuses_params_that_do_not_fit_the_config(tmp_path):
    """A config whose hidden sizes disagree with the stored params: refused, naming the leaf."""
    net = nn.mlp([16, 10])
    _, params, state = net.init(jax.random.key(0), (64,))
    config = {"model": "mlp", "hidden": [32], "activation": "relu", "input_shape": [64],
              "outputs": 10}  # fmt: skip
    ckpt = checkpoint.Checkpoint(config, params, state, optim.adam().init(params), {})
    checkpoint.save(tmp_path / "c.npz", ckpt)
    with pytest.raises(
        io.CheckpointError, match=r"params\[0\]\['w'\] should have shape \(64, 32\)"
    ):
        checkpoint.load(tmp_path / "c.npz")
    checkpoint.save(tmp_path / "ok.npz", ckpt._replace(config={**config, "hidden": [16]}))
    net2, ck = checkpoint.load(tmp_path / "ok.npz")
    assert net2.name == net.name and ck.config["hidden"] == [16]
    io.save(tmp_path / "plain.npz", {"params": params})
    with pytest.raises(io.CheckpointError, match="not a training checkpoint"):
        checkpoint.load(tmp_path / "plain.npz")


def test_regression_checkpoint_stores_the_target_scaling(tmp_path, capsys):
    path = tmp_path / "diabetes.npz"
    assert (
        cli.main(["train", "--data", "diabetes", "--epochs", "1", "--quiet", "--output", str(path)])
        == 0
    )
    pre = checkpoint.load(path)[1].preprocess
    assert set(pre) == {"x_shift", "x_scale", "y_shift", "y_scale"}
    assert pre["x_shift"].shape == pre["x_scale"].shape == (10,)
    assert 100 < float(pre["y_shift"]) < 200 and 50 < float(pre["y_scale"]) < 100


# ---------------------------------------------------------------------------------- check


def test_check_with_batchnorm_passes(capsys):
    assert cli.main(["check", "--batchnorm", "--loss", "huber", "--dropout", "0.2"]) == 0
    out = capsys.readouterr().out
    assert "BatchNorm" in out and out.rstrip().splitlines()[-1].startswith("OK:")


def test_check_prints_the_table_and_exits_0(capsys):
    argv = ["check", "--hidden", "6", "--activation", "gelu", "--loss", "mse", "--layernorm"]
    assert cli.main([*argv, "--dropout", "0.25", "--batch", "4"]) == 0
    out = capsys.readouterr().out
    assert "Gradient check of serial(Dense(6), LayerNorm, Gelu, Dropout(0.25), Dense(3))" in out
    assert re.search(r"^layer\s+name\s+param\s+shape\s+max abs err", out, re.MULTILINE)
    assert re.search(r"^1\s+LayerNorm\s+scale\s+\(6,\)", out, re.MULTILINE)
    assert re.search(r"^input\s+x\s+\(4, 5\)", out, re.MULTILINE)
    assert "FAIL" not in out and out.rstrip().splitlines()[-1].startswith("OK:")


def _buggy_tanh() -> Layer:
    """Tanh whose backward forgets the square: (1 - y) instead of (1 - y**2)."""
    return Layer(
        init=lambda key, shape: (tuple(shape), (), ()),
        forward=lambda params, state, x, **kw: (jnp.tanh(x), state, jnp.tanh(x)),
        backward=lambda params, y, dy: ((), (1 - y) * dy),
        name="BuggyTanh",
    )


def test_check_exits_1_when_a_gradient_is_wrong(capsys, monkeypatch):
    monkeypatch.setitem(nn.ACTIVATIONS, "tanh", _buggy_tanh())
    assert cli.main(["check", "--hidden", "4", "--loss", "sigmoid_binary_cross_entropy"]) == 1
    out = capsys.readouterr().out
    assert "BuggyTanh" in out and "FAIL" in out and "FAILED:" in out


# ---------------------------------------------------------------------------------- help, errors


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--help"], ["train", "check", "COMMAND --help"]),
        (
            ["train", "--help"],
            [
                "--data",
                "--model",
                "--hidden",
                "--channels",
                "--output",
                "--backup-dir",
                "--no-compile-cache",
                "examples:",
            ],
        ),
        (["check", "--help"], ["--loss", "--layernorm", "--dropout", "Exit status"]),
    ],
)
def test_help(capsys, argv, expected):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for text in expected:
        assert text in out


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "required"),
        (["train", "--hidden", "128,0"], "positive layer widths"),
        (["train", "--data", "cifar"], "invalid choice"),
        (["train", "--lr", "-1"], "positive float"),
        (["train", "--test-size", "1.5"], "fraction in (0, 1)"),
        (["train", "--test-size", "1.0"], "fraction in (0, 1) such as 0.2, or a whole count"),
        (["train", "--seed", "-1"], "an int in [0, 2**32 - 1], got '-1'"),
        (["train", "--seed", str(2**40)], "an int in [0, 2**32 - 1]"),
        (["train", "--output", ""], "--output: expected a file path, got an empty string"),
        (["train", "--output", "/no/such/dir/c.npz"], "the directory '/no/such/dir' does not"),
        (["train", "--output", "/proc/c.npz"], "cannot write into '/proc'"),
        (["train", "--backup-dir", ""], "--backup-dir: expected a directory path"),
        (["train", "--model", "cnn", "--data", "diabetes"], "--model cnn needs images"),
        (["check", "--dropout", "1.0"], "drop probability"),
        (["check", "--model", "cnn", "--hidden", ""], "needs at least one conv block"),
    ],
)
def test_bad_arguments_exit_2_with_one_line_before_any_training(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert message in captured.err
    assert len(captured.err.strip().splitlines()) == 1, captured.err  # one line, no traceback
    assert "Epoch" not in captured.out and "Traceback" not in captured.err


def test_output_directory_that_is_a_file_is_refused(capsys, tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SystemExit):
        cli.main(["train", "--output", str(tmp_path / "afile" / "c.npz")])
    assert "does not exist" in capsys.readouterr().err


def test_a_diverged_run_exits_3_and_leaves_an_existing_checkpoint_alone(capsys, tmp_path):
    path = tmp_path / "c.npz"
    path.write_bytes(b"the previous checkpoint")
    argv = ["train", "--optimizer", "sgd", "--lr", "1e30", "--epochs", "2", "--quiet"]
    assert cli.main([*argv, "--output", str(path)]) == 3
    err = capsys.readouterr().err
    assert "training diverged" in err and "was not written" in err
    assert path.read_bytes() == b"the previous checkpoint"


def test_train_and_check_a_cnn(capsys, tmp_path):
    path = tmp_path / "cnn.npz"
    argv = ["train", "--model", "cnn", "--channels", "4,8", "--epochs", "2", "--quiet"]
    assert cli.main([*argv, "--output", str(path)]) == 0
    assert _number(r"test accuracy: ([0-9.]+)", capsys.readouterr().out) > 0.5
    net, ck = checkpoint.load(path)
    assert ck.config["model"] == "cnn" and ck.config["input_shape"] == [8, 8, 1]
    assert net.name.startswith("serial(Conv2D(4, 3x3, same), BatchNorm, Relu, MaxPool2D")
    assert cli.main(["check", "--model", "cnn"]) == 0
    out = capsys.readouterr().out
    assert "GlobalAvgPool" in out and out.rstrip().splitlines()[-1].startswith("OK:")


def test_python_dash_m_fbp_entry_point():
    run = subprocess.run(
        [sys.executable, "-m", "fbp", "--help"], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert "usage: python -m fbp" in run.stdout and "train" in run.stdout


def test_hidden_empty_gives_a_linear_model():
    assert cli._sizes("") == ()
    assert cli._sizes("128, 64") == (128, 64)
    config = {"model": "mlp", "hidden": [], "activation": "relu", "outputs": 3}
    assert checkpoint.network(config).name == nn.serial(nn.Dense(3)).name


# ---------------------------------------------------------------------------------- processes


def _fbp(args, env, timeout=240, **kw):
    cmd = [sys.executable, "-m", "fbp", *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kw)  # fmt: skip


def _env(tmp_path):
    return {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "JAX_PLATFORMS": "cpu"}


def test_training_killed_at_random_moments_resumes_to_the_same_final_params(tmp_path):
    """SIGKILL a `train --backup-dir` run at random moments after a backup exists, three times,
    restart the same command each time: the final checkpoint's params, state and optimizer
    state are bit-identical to those of a run never killed."""
    env = _env(tmp_path)
    common = ["train", "--data", "mnist5k", "--hidden", "32", "--epochs", "12", "--quiet",
              "--no-compile-cache", "--seed", "5"]  # fmt: skip
    ref = _fbp([*common, "--output", str(tmp_path / "ref.npz")], env)
    assert ref.wait(timeout=240) == 0, ref.stderr.read()

    backup = tmp_path / "runs" / "backup.npz"
    run = [*common, "--backup-dir", str(tmp_path / "runs"), "--output", str(tmp_path / "out.npz")]
    rng = np.random.default_rng(0)
    epochs_seen = []
    for _ in range(3):
        proc = _fbp(run, env)
        deadline = time.monotonic() + 240
        while not backup.exists() or (epochs_seen and _backup_epoch(backup) <= epochs_seen[-1]):
            assert proc.poll() is None, f"finished before the kill: {proc.stderr.read()}"
            assert time.monotonic() < deadline, "no backup appeared"
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.1))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        epochs_seen.append(_backup_epoch(backup))
    assert epochs_seen == sorted(epochs_seen) and epochs_seen[-1] < 12  # resumed, not restarted
    final = _fbp(run, env)
    assert final.wait(timeout=240) == 0, final.stderr.read()
    assert not backup.exists()  # a finished run leaves no backup
    ref_tree, out_tree = io.load(tmp_path / "ref.npz"), io.load(tmp_path / "out.npz")
    for name in ("params", "state", "opt_state"):
        for a, b in zip(jax.tree.leaves(ref_tree[name]), jax.tree.leaves(out_tree[name]),
                        strict=True):  # fmt: skip
            assert a.dtype == b.dtype and np.array_equal(a, b), name


def _backup_epoch(path) -> int:
    for _ in range(50):  # the file may be replaced while we read it: retry
        try:
            return int(io.load(path)["epoch"])
        except (OSError, io.CheckpointError):
            time.sleep(0.01)
    raise AssertionError(f"cannot read {path}")


def test_a_second_identical_run_compiles_nothing(tmp_path):
    """The persistent compilation cache (on by default): the first run fills it, the second
    finds every program there and adds no entry; --no-compile-cache leaves it alone."""
    env = _env(tmp_path)
    argv = ["train", "--epochs", "2", "--quiet", "--hidden", "16"]
    first = _fbp(argv, env)
    assert first.wait(timeout=240) == 0, first.stderr.read()
    cache = tmp_path / "cache" / "fbp" / "jax"
    entries = sorted(p.name for p in cache.iterdir())
    assert entries, "the first run should fill the cache"
    second = _fbp(argv, env)
    assert second.wait(timeout=240) == 0, second.stderr.read()
    assert sorted(p.name for p in cache.iterdir()) == entries
    off_env = {**env, "XDG_CACHE_HOME": str(tmp_path / "other")}
    off = _fbp([*argv, "--no-compile-cache"], off_env)
    assert off.wait(timeout=240) == 0, off.stderr.read()
    assert not (tmp_path / "other").exists()
