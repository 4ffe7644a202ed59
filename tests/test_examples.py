"""Every script in ``examples/`` runs with ``--fast``, exits 0 and prints sensible numbers.

The scripts start together (one subprocess each, in its own temporary working directory) when
the first test asks for them, so their jax start-up and compile times overlap; each test then
waits for its own script and checks its output.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
SCRIPTS = [
    "backprop_walkthrough.py",
    "binary_breast_cancer.py",
    "cnn_mnist.py",
    "gradient_check.py",
    "gradient_norms.py",
    "keras_digits.py",
    "optimizer_comparison.py",
    "regression_diabetes.py",
    "sequence_digits.py",
    "transformer_sort.py",
]
TIMEOUT_S = 300


def _numbers(pattern: str, text: str) -> list[float]:
    found = [float(m) for m in re.findall(pattern, text)]
    assert found, f"no match for {pattern!r} in:\n{text}"
    return found


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """``{script: (returncode, output, cwd)}``, the scripts run concurrently with ``--fast``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.setdefault("JAX_PLATFORMS", "cpu")  # smoke runs: no accelerator start-up per process
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"  # in case they do share a GPU
    running = {}
    for script in SCRIPTS:
        cwd = tmp_path_factory.mktemp(script.removesuffix(".py"))
        log = open(cwd / "output.txt", "w")  # a file, not a pipe: nothing blocks on a full pipe
        proc = subprocess.Popen(
            [sys.executable, str(EXAMPLES / script), "--fast"],
            cwd=cwd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        running[script] = (proc, log, cwd)
    results = {}
    try:
        for script, (proc, log, cwd) in running.items():
            try:
                code = proc.wait(timeout=TIMEOUT_S)
            except subprocess.TimeoutExpired:
                code = None
            log.close()
            results[script] = (code, (cwd / "output.txt").read_text(), cwd)
    finally:
        for proc, log, _ in running.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    return results


def _run(outputs, script: str) -> tuple[str, Path]:
    code, out, cwd = outputs[script]
    assert code is not None, f"{script} ran past {TIMEOUT_S} s:\n{out}"
    assert code == 0, f"{script} exited with {code}:\n{out}"
    return out, cwd


def test_every_example_is_tested():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(SCRIPTS)


def test_every_example_has_a_docstring_and_is_short():
    for script in SCRIPTS:
        text = (EXAMPLES / script).read_text()
        assert text.startswith('"""'), f"{script} should open with a docstring"
        assert len(text.splitlines()) <= 110, f"{script} should stay a short script"


def test_keras_digits(outputs):
    out, _ = _run(outputs, "keras_digits.py")
    assert "Epoch 3/3" in out
    assert _numbers(r"test accuracy: ([0-9.]+)", out)[0] > 0.8  # ~0.97 after the full 30
    assert len(re.findall(r"label \d: predicted \d with probability", out)) == 5


def test_sequence_digits(outputs):
    out, _ = _run(outputs, "sequence_digits.py")
    assert "1437 train, 360 test sequences of 8 steps x 8 pixels" in out
    assert re.search(r"^0\s+LSTM\(64\)\s+\(64,\)\s+18,688", out, re.M)  # Keras's count
    assert "Epoch 3/3" in out
    assert _numbers(r"test accuracy: ([0-9.]+)", out)[0] > 0.6  # ~0.8 after 3, ~0.975 after 30
    wrong, total = map(int, re.search(r"(\d+) of (\d+) test digits misread", out).groups())
    assert total == 360 and wrong <= 0.4 * total


def test_transformer_sort(outputs):
    out, _ = _run(outputs, "transformer_sort.py")
    assert "Epoch 2/2" in out
    exact = _numbers(r"sorted exactly: ([0-9.]+)", out)[0]
    digits = _numbers(r"digits right: ([0-9.]+)", out)[0]
    assert 0.0 <= exact <= digits and digits > 0.25  # chance: 0.1; ~0.999 after the full run
    shown = re.findall(r"^  (\d{8}) -> (\d{8})$", out, re.M)
    assert len(shown) == 3


def test_gradient_norms(outputs):
    out, cwd = _run(outputs, "gradient_norms.py")
    rows = {int(m[0]): [float(v) for v in m[1:]]
            for m in re.findall(r"^\s+(\d+)" + r"\s+([0-9.e+-]+)" * 4 + "$", out, re.M)}  # fmt: skip
    assert sorted(rows) == [0, 1, 2, 5, 10, 20]  # --fast: 30 steps
    factors = [float(v) for v in re.search(r"^factor" + r"\s+([0-9.]+)" * 4, out, re.M).groups()]
    rnn, gru, lstm, linear = factors
    assert max(rnn, gru, lstm) < 1 < linear  # three vanish, the 1.2 x orthogonal one explodes
    assert lstm > rnn  # the LSTM's gradient vanishes more slowly
    assert rows[20][0] < 1e-2 * rows[0][0]  # the SimpleRNN's: down by 100x in 20 steps
    assert linear == pytest.approx(1.2, abs=0.05)
    if "matplotlib not installed" not in out:
        assert (cwd / "gradient_norms.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_regression_diabetes(outputs):
    out, _ = _run(outputs, "regression_diabetes.py")
    baseline = _numbers(r"predict the training mean\): test mse ([0-9.]+)", out)[0]
    mse = _numbers(r"test mse: ([0-9.]+)", out)[0]
    assert mse < 0.85 * baseline  # the model beats predicting the mean
    assert _numbers(r"test R\^2: (-?[0-9.]+)", out)[0] > 0.15


def test_binary_breast_cancer(outputs):
    out, _ = _run(outputs, "binary_breast_cancer.py")
    assert _numbers(r"test accuracy: ([0-9.]+)", out)[0] > 0.85  # ~0.99 after the full 50
    rows = re.findall(r"^\s+(?:malignant|benign)\s+(\d+)\s+(\d+)$", out, re.M)
    assert len(rows) == 2  # the confusion matrix
    assert sum(int(a) + int(b) for a, b in rows) == 114  # every test example counted once


def test_optimizer_comparison(outputs):
    out, cwd = _run(outputs, "optimizer_comparison.py")
    rows = re.findall(
        r"^(\S+(?:, momentum=0\.9\))?)\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.]+)", out, re.M
    )
    assert [r[0] for r in rows] == [
        "sgd(0.1)",
        "sgd(0.01, momentum=0.9)",
        "rmsprop(1e-3)",
        "adam(1e-3)",
    ]
    for name, train_loss, _, test_acc in rows:
        assert float(train_loss) < 1.5, name  # from ~2.3 = log(10) at the start
        assert float(test_acc) > 0.8, name
    if "matplotlib not installed" in out:
        assert "pip install 'fbp[plot]'" in out
    else:
        assert "wrote optimizer_comparison.png" in out
        assert (cwd / "optimizer_comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gradient_check(outputs):
    out, _ = _run(outputs, "gradient_check.py")
    assert "network ok: True" in out and "LayerNorm ok: True" in out
    assert "BuggyTanh ok: False (the check caught the bug: True)" in out
    assert re.search(r"^layer\s+name\s+param\s+shape", out, re.M)


def test_backprop_walkthrough(outputs):
    out, _ = _run(outputs, "backprop_walkthrough.py")
    diffs = _numbers(r"max \|diff\| ([0-9.e+-]+)", out)
    assert len(diffs) == 4 and max(diffs) < 1e-12  # hand vs jax.grad, in float64
    assert _numbers(r"max \|fbp grad - hand grad\| ([0-9.e+-]+)", out)[0] < 1e-12
    losses = _numbers(r"after step \d: loss ([0-9.]+)", out)
    assert losses == sorted(losses, reverse=True)  # each step lowers the loss
    assert "the loss went down" in out and out.rstrip().endswith("True")


def test_cnn_mnist(outputs):
    out, _ = _run(outputs, "cnn_mnist.py")
    assert "Conv2D(16, 3x3, same)" in out and "total params: 20,586" in out
    assert "Epoch 2/2" in out
    assert (
        _numbers(r"test accuracy: ([0-9.]+)", out)[0] > 0.4
    )  # 2 epochs on 1000 (~0.56); 0.97 full
