"""Data parallelism on many devices and many processes (``mesh=``, ``--devices``,
``jax.distributed``).

JAX's device count and ``jax.distributed`` must be set up before JAX starts, so the work runs
in subprocesses (``tests/dist_worker.py``), one per configuration, on 127.0.0.1 with free
ports; each is bounded by a timeout. The worker measures, the tests here hold the tolerances:
float64 to 1e-12 and float32 to 1e-5, relative (the order of the sums is all that differs).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from fbp import checkpoint, cli

TESTS = Path(__file__).resolve().parent
WORKER = TESTS / "dist_worker.py"


def _env(**extra) -> dict:
    """The environment of a subprocess: this checkout's fbp, CPU only, JAX's device count left
    to the worker, and the coordinator bound to the loopback address."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_NUM_CPU_DEVICES"}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS.parent), env.get("PYTHONPATH", "")])
    env["JAX_PLATFORMS"] = "cpu"
    return {**env, **extra}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(args: list, env: dict, stdout=subprocess.PIPE) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *map(str, args)], env=env, stdout=stdout,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def _finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"no result within {timeout} s (a hang):\n{err[-3000:]}") from None
    return proc.returncode, out, err


def test_four_devices_give_the_single_device_results(tmp_path):
    """One process with 4 CPU devices, started by ``python -m fbp train --devices 4``: the
    command line's test accuracy, every layer's and loss's gradients with the batch split over
    the devices (Explicit and Auto meshes), fit/evaluate/predict with BatchNorm, Dropout and a
    padded last batch, and a resumed run, each against one device."""
    out = tmp_path / "results.json"
    status, _, err = _finish(_spawn([WORKER, "devices", out], _env()), timeout=300)
    assert status == 0, err[-3000:]
    r = json.loads(out.read_text())

    assert r["device count"] == 4  # --devices 4 set JAX's CPU device count before JAX started
    assert r["cli 4 devices"] == r["cli 1 device"]  # the same test loss and accuracy
    for kind in ("Explicit", "Auto"):
        for net in ("conv2d", "conv1d-masked", "sequence-masked"):
            assert r[f"{net} {kind}"] < 1e-12, (net, kind)  # float64 gradients and state
        for loss in ("mse", "mae", "huber", "sigmoid_bce", "softmax_ce", "softmax_ce_smoothed"):
            assert r[f"loss {loss} {kind}"] < 1e-12, (loss, kind)
        assert r[f"fit mlp float64 {kind}"] < 1e-12
        assert r[f"history mlp float64 {kind}"] < 1e-12
        assert r[f"fit batchnorm float32 {kind}"] < 1e-5  # params and running statistics
        assert r[f"history batchnorm float32 {kind}"] < 1e-5
        assert r[f"evaluate batchnorm float32 {kind}"] < 1e-5
        assert r[f"predict batchnorm float32 {kind}"] < 1e-5
        assert r[f"replicated mlp float64 {kind}"] and r[f"replicated batchnorm float32 {kind}"]
    assert r["load keeps the shardings"]
    assert r["resumed bit-identical"]
    assert "batch_size 30 is not divisible by the 4 devices" in r["error batch 30"]
    assert "e.g. 28 or 32" in r["error batch 30"]
    assert "the mesh has no axis 'batch'" in r["error axis"]


def _train_args(port: int, pid: int, output: Path, *extra: str) -> list[str]:
    return ["train", "--hidden", "16", "--devices", "2", "--coordinator", f"127.0.0.1:{port}",
            "--num-processes", "2", "--process-id", str(pid), "--output", str(output),
            "--no-compile-cache", "--init-timeout", "60", *extra]  # fmt: skip


def test_two_processes_train_together_and_agree(tmp_path, capsys):
    """2 processes x 2 CPU devices through jax.distributed: identical params in both,
    equal to a one-process run within float32 rounding; only process 0 writes the checkpoint,
    and every process loads it back onto the mesh."""
    port = _free_port()
    env = _env(JAX_COORDINATOR_BIND_ADDRESS=f"127.0.0.1:{port}")
    ckpt = tmp_path / "ckpt.npz"
    epochs = ["--epochs", "3", "--quiet"]
    procs = [
        _spawn([WORKER, "process", tmp_path, *_train_args(port, pid, ckpt, *epochs)], env)
        for pid in (0, 1)
    ]
    finished = [_finish(p, timeout=240) for p in procs]
    for status, _, err in finished:
        assert status == 0, err[-3000:]
    assert finished[0][1].count("test accuracy") == 1 and "test" not in finished[1][1]
    results = [json.loads((tmp_path / f"result{pid}.json").read_text()) for pid in (0, 1)]
    for pid, r in enumerate(results):
        assert (r["processes"], r["devices"], r["status"]) == (2, 4, 0)
        assert r["wrote checkpoint"] == (pid == 0)
        assert r["loaded equal"] and r["loaded on the mesh"]
        assert "sharded over devices of other processes" in r["refused a cross-process shard"]
    params = [np.load(tmp_path / f"params{pid}.npz") for pid in (0, 1)]
    for name in params[0].files:
        assert np.array_equal(params[0][name], params[1][name]), name  # bit for bit
    _, stored = checkpoint.load(ckpt)
    stored = [np.asarray(p) for p in jax.tree.leaves(stored.params)]
    assert all(np.array_equal(a, params[0][f"arr_{i}"]) for i, a in enumerate(stored))

    single = tmp_path / "single.npz"  # the same run in one process, on one device
    assert cli.main(["train", "--hidden", "16", *epochs, "--output", str(single)]) == 0
    test_line = [line for line in finished[0][1].splitlines() if line.startswith("test loss")]
    assert capsys.readouterr().out.splitlines()[0] == test_line[0]
    _, ref = checkpoint.load(single)
    for a, r in zip(stored, jax.tree.leaves(ref.params), strict=True):
        assert np.max(np.abs(a - r)) <= 1e-5 * np.max(np.abs(r))


def test_a_process_that_dies_ends_the_others_with_a_clear_error(tmp_path):
    """SIGKILL process 1 during training: process 0 ends within the heartbeat timeout (plus
    slack for this loaded machine) instead of waiting in a collective, naming the cause."""
    port = _free_port()
    env = _env(JAX_COORDINATOR_BIND_ADDRESS=f"127.0.0.1:{port}")
    extra = ["--epochs", "1000", "--heartbeat-timeout", "3"]
    log = tmp_path / "process0.out"
    with open(log, "w") as out:
        args = [
            ["-m", "fbp", *_train_args(port, pid, tmp_path / "x.npz", *extra)] for pid in (0, 1)
        ]
        procs = [_spawn(args[0], env, out), _spawn(args[1], env, subprocess.DEVNULL)]
    try:
        deadline = time.monotonic() + 120
        while "Epoch 2/" not in log.read_text():  # process 0 prints one line per epoch
            assert procs[0].poll() is None, procs[0].stderr.read()[-3000:]
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.1)
        procs[1].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        status, _, err = _finish(procs[0], timeout=60)
        assert status != 0
        assert time.monotonic() - killed < 30
        assert "stopped sending heartbeats" in err or "another task died" in err, err[-3000:]
        assert not (tmp_path / "x.npz").exists()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_an_unreachable_coordinator_is_a_clear_error_within_the_timeout(capsys):
    """Process 1 whose coordinator never answers exits with status 4 and one line, after
    --init-timeout seconds, before it touches JAX (checked in this process: no subprocess)."""
    port = _free_port()  # nothing listens there
    t0 = time.monotonic()
    argv = ["train", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
            "--process-id", "1", "--init-timeout", "1"]  # fmt: skip
    assert cli.main(argv) == 4
    assert time.monotonic() - t0 < 10
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"cannot reach the coordinator at 127.0.0.1:{port} within 1 s" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--devices", "3"], "--batch-size 32 is not divisible by the 3 devices"),
        (["--devices", "8"], "--devices 8: JAX has"),
        (["--process-id", "2", "--num-processes", "2"], "--process-id must be in"),
        (["--coordinator", "nohost"], "expected HOST:PORT"),
    ],
)
def test_bad_device_and_process_arguments_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
