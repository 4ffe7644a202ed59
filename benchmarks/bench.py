"""fbp against jax.grad and against hardware bounds, side by side in one process.

    python benchmarks/bench.py                 # full run, a few minutes
    python benchmarks/bench.py --quick         # smoke test, about a minute
    python benchmarks/bench.py --only a,d      # some sections
    python benchmarks/bench.py --json out.json

Sections (each row of the table is one measurement, "met" compares its ratio with the target):
    a  train step: fbp.train.make_step against jax.value_and_grad + the same optimizer update
    b  fbp.train.fit for 4 epochs (compilation included) against a Python loop of jitted steps
    c  a GEMM-only lower bound (the matrix products of one step) as a fraction of fbp's step
    d  fbp's Adam update against the copy bound (3.5x a donated `x + 1.0` over n float32), and
       the obvious `jit(opt.update, donate_argnums=(1, 2))` against the fastest call
    e  peak memory of a large-batch step, fbp against jax.grad, each in its own subprocess
    f  train steps of sequence models: an LSTM and a transformer block, fbp against jax.grad;
       and (information) the two places BPTT can sum the weight gradients, in_scan / after_scan

The machine is shared and noisy, so competitors are timed in turn (A, B, A, B, ... with the order
flipped every round), each sample after a warm-up, and each ratio is the median of the per-round
ratios; "spread" is the interquartile range of those per-round ratios. Everything is float32 and
every sample ends in ``jax.block_until_ready``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import fbp
from fbp import losses, nn, optim, train

LOSS = losses.softmax_cross_entropy
OPT = optim.adam(1e-3)
HERE = Path(__file__).resolve().parent
SECTIONS = "abcdef"


@dataclass
class Row:
    """One line of the table. ``ratio`` is compared with ``target`` ("<= t" or ">= t")."""

    section: str
    name: str
    fbp: float
    reference: float
    unit: str
    ratio: float
    target: str  # "<= 1.00", ">= 1.80", or "-" for a row that is information only
    spread: tuple[float, float] | None = None  # quartiles of the per-round ratios

    @property
    def met(self) -> str:
        if self.target == "-":
            return "-"
        op, bound = self.target.split()
        ok = self.ratio <= float(bound) if op == "<=" else self.ratio >= float(bound)
        return "yes" if ok else "no"


@dataclass
class Config:
    repeats: int  # rounds of interleaved samples
    steps: int  # train steps per timing sample
    fit_repeats: int
    memory_runs: int  # subprocesses per competitor
    memory_steps: int  # steps per subprocess


FULL = Config(repeats=21, steps=20, fit_repeats=5, memory_runs=5, memory_steps=3)
QUICK = Config(repeats=3, steps=5, fit_repeats=1, memory_runs=1, memory_steps=1)


# ---------------------------------------------------------------------------------------------
# Timing


def interleaved(samplers: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Call each sampler once per round, in turn (order flipped every round): name -> samples."""
    names = list(samplers)
    samples = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            samples[name].append(samplers[name]())
    return samples


def paired_ratio(num: list[float], den: list[float]) -> tuple[float, tuple[float, float]]:
    """Median and quartiles of the per-round ratios num[r] / den[r]."""
    r = np.asarray(num) / np.asarray(den)
    return float(np.median(r)), (float(np.quantile(r, 0.25)), float(np.quantile(r, 0.75)))


class StepSampler:
    """Times ``n`` steps of a donating ``step(params, state, opt_state, x, y)``, feeding the
    results back."""

    def __init__(self, step, params, state, opt_state, x, y, n: int):
        self.step, self.carry, self.x, self.y, self.n = step, (params, state, opt_state), x, y, n

    def __call__(self) -> float:
        carry = self.carry
        t0 = time.perf_counter()
        for _ in range(self.n):
            *carry, value = self.step(*carry, self.x, self.y)
        jax.block_until_ready((carry, value))
        elapsed = time.perf_counter() - t0
        self.carry = tuple(carry)  # the old buffers were donated
        return elapsed / self.n

    def warm_up(self, times: int = 3) -> StepSampler:
        for _ in range(times):
            self()
        return self


# ---------------------------------------------------------------------------------------------
# The two competitors of a train step


def mlp(hidden: list[int], act=nn.Relu, classes: int = 10):
    return nn.mlp([*hidden, classes], act)


def jax_grad_step(net, loss=LOSS, opt=OPT):
    """The step a JAX user writes: autodiff of ``loss(net.apply(...))``, then fbp's optimizer,
    with the same signature and donation as ``train.make_step``."""

    def step(params, state, opt_state, x, y):
        def loss_and_state(p):
            pred, new_state, _ = net.forward(p, state, x, train=True)
            return loss.value(pred, y), new_state

        (value, state), grads = jax.value_and_grad(loss_and_state, has_aux=True)(params)
        params, opt_state = opt.update(grads, params, opt_state)
        return params, state, opt_state, value

    return jax.jit(step, donate_argnums=(0, 1, 2))


def problem(hidden, batch, act=nn.Relu, seed=0):
    """(net, params, state, x, y): random float32 inputs of MNIST shape, integer labels."""
    net = mlp(hidden, act)
    _, params, state = net.init(jax.random.key(seed), (784,))
    kx, ky = jax.random.split(jax.random.key(seed + 1))
    x = jax.random.normal(kx, (batch, 784), jnp.float32)
    y = jax.random.randint(ky, (batch,), 0, 10)
    return net, params, state, x, y


def copy_tree(tree):
    return jax.tree.map(jnp.copy, tree)


def step_samplers(net, params, state, x, y, n) -> dict[str, StepSampler]:
    steps = {"fbp": train.make_step(net, LOSS, OPT), "jax.grad": jax_grad_step(net)}
    return {
        name: StepSampler(
            step, copy_tree(params), copy_tree(state), OPT.init(params), x, y, n
        ).warm_up()
        for name, step in steps.items()
    }


def bytes_accessed(compiled) -> float | None:
    """XLA's own count of the bytes its compiled program reads and writes, if it reports one."""
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost["bytes accessed"])
    except (KeyError, IndexError, TypeError, AttributeError, NotImplementedError):
        return None


def hlo_stats(jitted, *args) -> dict:
    """Counts of a few ops in the compiled (optimized) HLO of ``jitted(*args)``, and XLA's cost
    estimate: enough to see whether two programs differ beyond names."""
    compiled = jitted.lower(*args).compile()
    text = compiled.as_text()
    counts = {
        op: text.count(f" {op}(")
        for op in ("dot", "fusion", "copy", "transpose", "reduce", "while")
    }
    # XLA:CPU hands most matmuls to YNNPACK inside a fusion; a dot left at top level (here the
    # dW = x^T dy products, which contract both operands' leading axis) runs on its own.
    counts["top_level_dot"] = text.split("ENTRY", 1)[-1].count(" dot(")
    counts["ynn_fusion"] = text.count('"__ynn_fusion"')
    counts["bytes_accessed"] = bytes_accessed(compiled)
    return counts


# ---------------------------------------------------------------------------------------------
# a. train step


STEP_NETS = [  # name, hidden widths (or "lenet5"), activation, batch
    ("784-128-10 relu b128", [128], nn.Relu, 128),
    ("784-512-512-10 relu b128", [512, 512], nn.Relu, 128),
    ("784-1024-1024-10 relu b256", [1024, 1024], nn.Relu, 256),
    ("784-8x256-10 tanh b128", [256] * 8, nn.Tanh, 128),
    ("LeNet-5 CNN 28x28x1 b128", "lenet5", nn.Relu, 128),
    ("CNN Conv16-BN-Conv32-BN (cnn_mnist) b128", "cnn", nn.Relu, 128),
]


def lenet5():
    """LeNet-5 on 28x28x1 (the first convolution padded to keep 28x28), ReLU and max pooling."""
    return nn.serial(
        nn.Conv2D(6, 5, padding="same"), nn.Relu, nn.MaxPool2D(2),
        nn.Conv2D(16, 5), nn.Relu, nn.MaxPool2D(2), nn.Flatten,
        nn.Dense(120), nn.Relu, nn.Dense(84), nn.Relu, nn.Dense(10),
    )  # fmt: skip


def cnn_problem(kind: str, batch: int, seed: int = 0):
    """(net, params, state, x, y) for a CNN on random 28x28x1 images."""
    net = lenet5() if kind == "lenet5" else nn.cnn([16, 32], 10)
    _, params, state = net.init(jax.random.key(seed), (28, 28, 1))
    kx, ky = jax.random.split(jax.random.key(seed + 1))
    x = jax.random.normal(kx, (batch, 28, 28, 1), jnp.float32)
    y = jax.random.randint(ky, (batch,), 0, 10)
    return net, params, state, x, y


def section_a(cfg: Config) -> tuple[list[Row], dict]:
    rows, details = [], {}
    for name, hidden, act, batch in STEP_NETS:
        if isinstance(hidden, str):
            net, params, state, x, y = cnn_problem(hidden, batch)
        else:
            net, params, state, x, y = problem(hidden, batch, act)
        samplers = step_samplers(net, params, state, x, y, cfg.steps)
        details[name] = {
            k: hlo_stats(sampler.step, params, state, OPT.init(params), x, y)
            for k, sampler in samplers.items()
        }
        t = interleaved(samplers, cfg.repeats)
        ratio, spread = paired_ratio(t["fbp"], t["jax.grad"])
        rows.append(
            Row(
                "a",
                f"step {name}",
                1e3 * np.median(t["fbp"]),
                1e3 * np.median(t["jax.grad"]),
                "ms",
                ratio,
                "<= 1.00",
                spread,
            )
        )
        print_row(rows[-1])
        details[name]["ms"] = {k: [1e3 * v for v in vs] for k, vs in t.items()}
    return rows, details


# ---------------------------------------------------------------------------------------------
# b. fit against a Python loop of jitted steps


def mnist_60k() -> tuple[np.ndarray, np.ndarray]:
    """The bundled 5000 MNIST images, scaled to [0, 1], tiled to 60000 (MNIST's size)."""
    X, y = fbp.datasets.load_mnist_5k(scale=True)
    return np.tile(X, (12, 1)).astype(np.float32), np.tile(y, 12).astype(np.int32)


def clear_compilation_caches() -> None:
    """Forget every compiled program (fbp's programs live in jax's own caches)."""
    jax.clear_caches()


def python_loop(step, params, state, X, y, *, epochs, batch_size, seed):
    """The loop a JAX user writes: a numpy permutation per epoch, batches sliced on the host,
    one jitted value_and_grad + update per batch (the last, partial batch compiles once more),
    the epoch's mean loss fetched at its end (as fit does)."""
    opt_state = OPT.init(params)
    rng = np.random.default_rng(seed)
    n = X.shape[0]
    history = []
    for _ in range(epochs):
        perm = rng.permutation(n)
        values = []
        for start in range(0, n, batch_size):
            idx = perm[start : start + batch_size]
            params, state, opt_state, value = step(
                params, state, opt_state, jnp.asarray(X[idx]), jnp.asarray(y[idx])
            )
            values.append(value * len(idx))
        history.append(float(jnp.sum(jnp.stack(values))) / n)
    jax.block_until_ready(params)
    return params, history


def section_b(cfg: Config) -> tuple[list[Row], dict]:
    epochs, batch = 4, 128
    X, y = mnist_60k()
    net = mlp([128])
    _, params, state = net.init(jax.random.key(0), (784,))
    key = jax.random.key(1)
    warm_step = jax_grad_step(net)  # reused by the "compiled" rows

    def run_fit(fresh: bool) -> float:
        if fresh:
            clear_compilation_caches()
        p = copy_tree(params)
        t0 = time.perf_counter()
        out, *_ = train.fit(
            net, LOSS, OPT, p, state, (X, y), epochs=epochs, batch_size=batch, key=key, verbose=0
        )
        jax.block_until_ready(out)
        return time.perf_counter() - t0

    def run_loop(fresh: bool) -> float:
        if fresh:
            clear_compilation_caches()
        p = copy_tree(params)
        t0 = time.perf_counter()
        step = jax_grad_step(net) if fresh else warm_step
        python_loop(step, p, state, X, y, epochs=epochs, batch_size=batch, seed=0)
        return time.perf_counter() - t0

    rows, details = [], {}
    for fresh in (True, False):
        if not fresh:  # compile both once, outside the timing
            run_fit(False)
            run_loop(False)
        t = interleaved(
            {"fit": lambda f=fresh: run_fit(f), "loop": lambda f=fresh: run_loop(f)},
            cfg.fit_repeats,
        )
        speedup, spread = paired_ratio(t["loop"], t["fit"])
        rows.append(
            Row(
                "b",
                f"fit 4 epochs 60k b128, {'with compile' if fresh else 'compiled'} (loop/fit)",
                float(np.median(t["fit"])),
                float(np.median(t["loop"])),
                "s",
                speedup,
                ">= 1.80" if fresh else "-",
                spread,
            )
        )
        print_row(rows[-1])
        details["with compile" if fresh else "compiled"] = t
    compile_rows, details["compile"] = compile_costs(cfg, net, params, state, X, y, key, batch)
    return rows + compile_rows, details


def compile_costs(cfg: Config, net, params, state, X, y, key, batch) -> tuple[list[Row], dict]:
    """Where a cold fit's fixed cost goes, and what the caches save.

    * fit's epoch program: tracing, lowering to StableHLO, XLA's compilation (caches cleared
      before each sample), beside the time of one compiled epoch;
    * a second fit with an equal configuration (network, loss and optimizer built anew): the
      number of XLA compilations it triggers (jax.monitoring's backend-compile events);
    * a second ``python -m fbp train`` (the default run) with JAX's persistent cache, against
      the first, each a fresh process with a fresh cache directory.
    """
    import tempfile

    n_steps = -(-X.shape[0] // batch)
    order = jnp.arange(n_steps * batch, dtype=jnp.int32) % X.shape[0]
    Xd, yd = jax.device_put(X), jax.device_put(y)
    kw = dict(net=net, loss=LOSS, optimizer=OPT, batch_size=batch, metric_fns=(),
              progress=False, unroll=1)  # fmt: skip
    args = (params, state, OPT.init(params), Xd, yd, order, key, 0, np.float32(0))
    parts = {"trace": [], "lower": [], "compile": [], "epoch": []}
    for _ in range(max(cfg.fit_repeats, 2)):
        clear_compilation_caches()
        t0 = time.perf_counter()
        traced = train._run_epoch.trace(*args, **kw)
        t1 = time.perf_counter()
        lowered = traced.lower()
        t2 = time.perf_counter()
        compiled = lowered.compile()
        t3 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        t4 = time.perf_counter()
        for k, v in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            parts[k].append(v)
    med = {k: float(np.median(v)) for k, v in parts.items()}
    rows = [
        Row("b", f"fit's epoch program: {k}, 784-128-10 b{batch} (information)",
            1e3 * med[k], 1e3 * med["epoch"], "ms", med[k] / med["epoch"], "-")
        for k in ("trace", "lower", "compile")
    ]  # fmt: skip

    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **_: (
            compiles.append(event)
            if event == "/jax/core/compile/backend_compile_duration"
            else None
        )
    )

    def fit_anew():
        fresh_net, fresh_opt = mlp([128]), fbp.optim.adam(1e-3)  # equal, not identical
        out = train.fit(
            fresh_net,
            losses.softmax_cross_entropy,
            fresh_opt,
            params,
            state,
            (X[:4096], y[:4096]),
            epochs=1,
            batch_size=batch,
            key=key,
            verbose=0,
        )
        jax.block_until_ready(out[0])  # fmt: skip

    fit_anew()
    before = len(compiles)
    fit_anew()
    rows.append(Row("b", "second fit, equal configuration built anew: XLA compilations",
                    float(len(compiles) - before), 0.0, "", float(len(compiles) - before),
                    "<= 0.00"))  # fmt: skip

    def cli_run(cache: str) -> float:
        env = {**os.environ, "XDG_CACHE_HOME": cache}
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "fbp", "train", "--quiet"], env=env, check=True,
                       capture_output=True)  # fmt: skip
        return time.perf_counter() - t0

    firsts, seconds = [], []
    for _ in range(max(cfg.fit_repeats // 2, 1)):
        with tempfile.TemporaryDirectory() as cache:
            firsts.append(cli_run(cache))
            seconds.append(cli_run(cache))
    ratio, spread = paired_ratio(seconds, firsts)
    rows.append(Row("b", "python -m fbp train: second run / first (persistent compile cache)",
                    float(np.median(seconds)), float(np.median(firsts)), "s", ratio, "<= 0.70",
                    spread))  # fmt: skip
    for row in rows:
        print_row(row)
    return rows, {"ms": {k: [1e3 * x for x in v] for k, v in parts.items()},
                  "cli_s": {"first": firsts, "second": seconds}}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# c. GEMM-only lower bound


def gemm_bound(x, w1, w2, w3, dy):
    """Only the matrix products of a 3-layer MLP step, in the same shapes and order; the
    elementwise work (bias, ReLU, loss, Adam) is left out, so this is a lower bound."""
    h1 = x @ w1  # (B, 1024)
    h2 = h1 @ w2  # (B, 1024)
    out = h2 @ w3  # (B, 10)
    dw3 = h2.T @ dy  # (1024, 10); dy stands for dloss/dout, (B, 10)
    dy2 = dy @ w3.T  # (B, 1024)
    dw2 = h1.T @ dy2  # (1024, 1024)
    dy1 = dy2 @ w2.T  # (B, 1024)
    dw1 = x.T @ dy1  # (784, 1024); dx of the first layer is not needed
    return out, dw1, dw2, dw3


def section_c(cfg: Config) -> tuple[list[Row], dict]:
    name, hidden, act, batch = STEP_NETS[2]
    net, params, state, x, y = problem(hidden, batch, act)
    samplers = step_samplers(net, params, state, x, y, cfg.steps)
    del samplers["jax.grad"]
    ws = [params[i]["w"] for i in (0, 2, 4)]
    dy = jax.random.normal(jax.random.key(3), (batch, 10), jnp.float32)
    bound = jax.jit(gemm_bound)

    def sample_bound() -> float:
        t0 = time.perf_counter()
        for _ in range(cfg.steps):
            out = bound(x, *ws, dy)
        jax.block_until_ready(out)
        return (time.perf_counter() - t0) / cfg.steps

    sample_bound()
    samplers["bound"] = sample_bound
    t = interleaved(samplers, cfg.repeats)
    ratio, spread = paired_ratio(t["bound"], t["fbp"])
    row = Row(
        "c",
        f"GEMM bound / fbp step, {name}",
        1e3 * np.median(t["fbp"]),
        1e3 * np.median(t["bound"]),
        "ms",
        ratio,
        ">= 0.85",
        spread,
    )
    print_row(row)
    details = {"ms": {k: [1e3 * v for v in vs] for k, vs in t.items()}}
    details["hlo"] = hlo_stats(bound, x, *ws, dy)
    return [row], details


# ---------------------------------------------------------------------------------------------
# d. Adam update against memory bandwidth


ADAM_SHAPES = [(2048, 2048), (2048, 2048), (1536, 1024)]  # 9,961,472 float32 params


def section_d(cfg: Config) -> tuple[list[Row], dict]:
    keys = jax.random.split(jax.random.key(4), 2 * len(ADAM_SHAPES))
    params = {f"w{i}": jax.random.normal(keys[i], s) for i, s in enumerate(ADAM_SHAPES)}
    grads = {f"w{i}": 1e-3 * jax.random.normal(keys[-1 - i], s) for i, s in enumerate(ADAM_SHAPES)}
    n = sum(int(np.prod(s)) for s in ADAM_SHAPES)

    # jit matches donated inputs to outputs in order; update takes (grads, params, state) and
    # returns (params, state), so the obvious jit(OPT.update, donate_argnums=(1, 2)) pairs each
    # donated buffer with its own new value. The second variant is a wrapper that puts the
    # donated arguments first, for comparison: the two should take the same time.
    obvious = jax.jit(OPT.update, donate_argnums=(1, 2))

    def update_obvious(params, state, grads):
        return obvious(grads, params, state)

    def update_in_place(params, state, grads):
        return OPT.update(grads, params, state)

    variants = {
        "adam update via jit(opt.update, donate_argnums=(1, 2))": update_obvious,
        "adam update, wrapper donating (params, state)": jax.jit(
            update_in_place, donate_argnums=(0, 1)
        ),
    }
    xla_bytes = bytes_accessed(obvious.lower(grads, params, OPT.init(params)).compile())

    def adam_sampler(fn):
        carry = [copy_tree(params), OPT.init(params)]

        def sample() -> float:
            p, s = carry
            t0 = time.perf_counter()
            for _ in range(cfg.steps):
                p, s = fn(p, s, grads)
            jax.block_until_ready((p, s))
            carry[:] = p, s
            return (time.perf_counter() - t0) / cfg.steps

        return sample

    # The copy bound: a jitted, donated ``x + 1.0`` over n float32 values moves 8 B per
    # value; Adam must move at least 28 B per param (read p, g, mu, nu; write p, mu, nu), so its
    # bound is 3.5 times that copy's time. The second copy (information) reads and writes as many
    # bytes as Adam's whole working set (4n values), so that both see the same caches.
    touch = jax.jit(lambda x, c: x + c, donate_argnums=0)
    one = jnp.ones((), jnp.float32)
    arrays = {"copy": [jnp.zeros(n, jnp.float32)], "copy 4n": [jnp.zeros(4 * n, jnp.float32)]}

    def copy_sampler(name):
        def sample() -> float:
            a = arrays[name][0]
            t0 = time.perf_counter()
            for _ in range(cfg.steps):
                a = touch(a, one)
            jax.block_until_ready(a)
            arrays[name][0] = a
            return (time.perf_counter() - t0) / cfg.steps

        return sample

    samplers = {name: adam_sampler(fn) for name, fn in variants.items()}
    samplers |= {name: copy_sampler(name) for name in arrays}
    for sample in list(samplers.values()) * 2:  # compile and warm up
        sample()
    t = interleaved(samplers, cfg.repeats)
    adam_bytes = 7 * 4 * n
    obvious_name, wrapper_name = variants
    rows = []
    for name, target in ((obvious_name, "<= 1.50"), (wrapper_name, "-")):
        ratio, spread = paired_ratio([a / 3.5 for a in t[name]], t["copy"])
        rows.append(Row("d", f"{name}, {n / 1e6:.1f}M params: time / (3.5 x copy of n float32)",
                        adam_bytes / np.median(t[name]) / 1e9,
                        8 * n / np.median(t["copy"]) / 1e9, "GB/s", ratio, target, spread))  # fmt: skip
        print_row(rows[-1])
    # The same against the copy of Adam's working-set size (the measure before wave 2).
    ratio, spread = paired_ratio([a / adam_bytes for a in t[obvious_name]],
                                 [c / (2 * 4 * 4 * n) for c in t["copy 4n"]])  # fmt: skip
    rows.append(Row("d", "adam update via jit(opt.update), time / copy-bound time at the 4n copy's "
                    "bandwidth", adam_bytes / np.median(t[obvious_name]) / 1e9,
                    2 * 4 * 4 * n / np.median(t["copy 4n"]) / 1e9, "GB/s", ratio, "-", spread))  # fmt: skip
    print_row(rows[-1])
    # The obvious jit against the fastest way to call the update.
    ratio, spread = paired_ratio(t[obvious_name], t[wrapper_name])
    rows.append(Row("d", "jit(opt.update, donate_argnums=(1, 2)) / wrapper donating (params, state)",
                    1e3 * np.median(t[obvious_name]), 1e3 * np.median(t[wrapper_name]), "ms",
                    ratio, "<= 1.10", spread))  # fmt: skip
    print_row(rows[-1])
    if xla_bytes:  # what XLA's fusions actually move, against the 28 bytes/param ideal
        rows.append(
            Row("d", "adam update, bytes/param XLA moves (ideal 28)", xla_bytes / n, 28.0, "B",
                xla_bytes / n / 28, "-")
        )  # fmt: skip
        print_row(rows[-1])
    details = {"n_params": n, "ms": {k: [1e3 * v for v in vs] for k, vs in t.items()}}
    return rows, details


# ---------------------------------------------------------------------------------------------
# e. Peak memory, each competitor in its own process


MEMORY_NET = ([1024] * 6, 4096)  # 784 -> 6 x 1024 relu -> 10, batch 4096
RESULT_TAG = "MEMORY_CHILD_RESULT "


def _vm_hwm_kib() -> int | None:
    """Peak resident set size (VmHWM) in KiB from /proc/self/status, or None."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def memory_child(which: str, steps: int) -> None:
    """Build and run one competitor's step; print its memory figures as one JSON line.

    Peak RSS is read from VmHWM, reset (``/proc/self/clear_refs``) after compilation so that it
    is the steps' own peak. ``ru_maxrss`` is reported too, but on Linux a spawned process
    inherits its parent's, so here it mostly measures the parent benchmark.
    """
    hidden, batch = MEMORY_NET
    net, params, net_state, x, y = problem(hidden, batch)
    step = train.make_step(net, LOSS, OPT) if which == "fbp" else jax_grad_step(net)
    state = OPT.init(params)
    compiled = step.lower(params, net_state, state, x, y).compile()
    stats = compiled.memory_analysis()
    xla = {
        k: getattr(stats, k, None)
        for k in (
            "temp_size_in_bytes",
            "argument_size_in_bytes",
            "output_size_in_bytes",
            "alias_size_in_bytes",
            "peak_memory_in_bytes",
        )
    }
    jax.block_until_ready((params, state, x, y))
    hwm_setup = _vm_hwm_kib()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
        reset = True
    except OSError:
        reset = False
    rss_before = _vm_hwm_kib()
    for _ in range(steps):
        params, net_state, state, value = compiled(params, net_state, state, x, y)
        jax.block_until_ready((params, state, value))
    result = {
        "which": which,
        "steps": steps,
        "loss": float(value),
        "hwm_setup_kib": hwm_setup,  # peak of building, tracing and compiling
        "hwm_reset": reset,
        "rss_before_steps_kib": rss_before if reset else None,
        "hwm_steps_kib": _vm_hwm_kib() if reset else None,  # peak while stepping
        "ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "xla": xla,
    }
    print(RESULT_TAG + json.dumps(result), flush=True)


def run_memory_child(which: str, steps: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child", which]
    cmd += ["--memory-steps", str(steps)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG) :])
    raise RuntimeError(f"memory child {which} failed:\n{proc.stdout}\n{proc.stderr}")


def section_e(cfg: Config) -> tuple[list[Row], dict]:
    hidden, batch = MEMORY_NET
    name = f"784-{len(hidden)}x{hidden[0]}-10 relu b{batch}"
    runs = {"fbp": [], "jax": []}
    for _ in range(cfg.memory_runs):  # interleaved, like the timings
        for which in runs:
            runs[which].append(run_memory_child(which, cfg.memory_steps))

    def median(which, get):
        return float(np.median([get(r) for r in runs[which]]))

    rows = []

    def mib_row(label, get, target):
        f, j = median("fbp", get), median("jax", get)
        rows.append(Row("e", f"{label}, {name}", f / 1024, j / 1024, "MiB", f / j, target))

    if all(r["hwm_reset"] for rs in runs.values() for r in rs):
        # What the steps add on top of params, state and data (and what tracing left behind).
        mib_row(
            "step memory (peak RSS in steps - RSS before)",
            lambda r: r["hwm_steps_kib"] - r["rss_before_steps_kib"],
            "<= 1.00",
        )
        mib_row("peak RSS in steps (VmHWM)", lambda r: r["hwm_steps_kib"], "-")
    mib_row("peak RSS incl. compile (VmHWM)", lambda r: r["hwm_setup_kib"], "-")
    if runs["fbp"][0]["xla"]["temp_size_in_bytes"] is not None:
        mib_row("XLA temp buffers", lambda r: r["xla"]["temp_size_in_bytes"] / 1024, "<= 1.00")
    for row in rows:
        print_row(row)
    return rows, runs


# ---------------------------------------------------------------------------------------------
# f. sequence models: an LSTM step and a transformer block step


SEQUENCE_NETS = [  # name, network, input shape (batch included), token labels per step
    ("LSTM(128)+Dense(10), b128 T28 F28",
     lambda: nn.serial(nn.LSTM(128), nn.Dense(10)), (128, 28, 28), False),
    ("TransformerBlock(128, 4 heads, MLP 512)+Dense(10), b64 T64",
     lambda: nn.serial(nn.TransformerBlock(128, 4, 512), nn.Dense(10)), (64, 64, 128), True),
]  # fmt: skip


def section_f(cfg: Config) -> tuple[list[Row], dict]:
    """The backward through time (reverse scan) and the attention's, against autodiff's: the
    same make_step / jax_grad_step race as section a, on sequence inputs. The transformer's
    loss is the softmax cross-entropy of every step's logits, (batch, T, 10) with (batch, T)
    labels."""
    rows, details = [], {}
    for name, make, shape, per_step in SEQUENCE_NETS:
        net = make()
        _, params, state = net.init(jax.random.key(0), shape[1:])
        kx, ky = jax.random.split(jax.random.key(1))
        x = jax.random.normal(kx, shape, jnp.float32)
        y = jax.random.randint(ky, shape[:2] if per_step else shape[:1], 0, 10)
        samplers = step_samplers(net, params, state, x, y, max(cfg.steps // 4, 1))
        details[name] = {
            k: hlo_stats(sampler.step, params, state, OPT.init(params), x, y)
            for k, sampler in samplers.items()
        }
        t = interleaved(samplers, cfg.repeats)
        ratio, spread = paired_ratio(t["fbp"], t["jax.grad"])
        rows.append(Row("f", f"step {name}", 1e3 * np.median(t["fbp"]),
                        1e3 * np.median(t["jax.grad"]), "ms", ratio, "<= 1.00", spread))  # fmt: skip
        print_row(rows[-1])
        details[name]["ms"] = {k: [1e3 * v for v in vs] for k, vs in t.items()}
    rows += weight_grads_rows(cfg, details)
    return rows, details


def weight_grads_rows(cfg: Config, details: dict) -> list[Row]:
    """Information rows behind ``weight_grads="auto"``: fbp's LSTM step with the recurrent
    layer's weight gradients summed inside the reverse scan against after it (2-D matmuls over
    all steps), and the same for GRU(128) and SimpleRNN(128)."""
    kx, ky = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, (128, 28, 28), jnp.float32)
    y = jax.random.randint(ky, (128,), 0, 10)
    rows = []
    for kind in ("LSTM", "GRU", "SimpleRNN"):
        samplers = {}
        for mode in ("in_scan", "after_scan"):
            net = nn.serial(getattr(nn, kind)(128, weight_grads=mode), nn.Dense(10))
            _, params, state = net.init(jax.random.key(0), (28, 28))
            step = train.make_step(net, LOSS, OPT)
            samplers[mode] = StepSampler(step, params, state, OPT.init(params), x, y,
                                         max(cfg.steps // 4, 1)).warm_up()  # fmt: skip
        t = interleaved(samplers, cfg.repeats)
        ratio, spread = paired_ratio(t["in_scan"], t["after_scan"])
        rows.append(Row("f", f"{kind}(128) weight grads in_scan / after_scan, b128 T28",
                        1e3 * np.median(t["in_scan"]), 1e3 * np.median(t["after_scan"]), "ms",
                        ratio, "-", spread))  # fmt: skip
        print_row(rows[-1])
        details[f"weight_grads {kind}"] = {k: [1e3 * v for v in vs] for k, vs in t.items()}
    return rows


# ---------------------------------------------------------------------------------------------
# Output


COLUMNS = ("name", "fbp", "reference", "ratio", "target", "met", "spread")


def cells(row: Row) -> list[str]:
    spread = "-" if row.spread is None else f"{row.spread[0]:.3f}-{row.spread[1]:.3f}"
    return [
        f"{row.section}. {row.name}",
        f"{row.fbp:.4g} {row.unit}",
        f"{row.reference:.4g} {row.unit}",
        f"{row.ratio:.3f}",
        row.target,
        row.met,
        spread,
    ]


def print_row(row: Row) -> None:
    print("  " + "  ".join(cells(row)), flush=True)


def table(rows: list[Row]) -> str:
    lines = [list(COLUMNS)] + [cells(row) for row in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(COLUMNS))]
    fmt = [
        " | ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(line, widths, strict=True))
        )
        for line in lines
    ]
    rule = "-+-".join("-" * w for w in widths)
    return "\n".join([fmt[0], rule, *fmt[1:]])


def machine_info() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_average": os.getloadavg(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": importlib.metadata.version("jaxlib"),
        "numpy": np.__version__,
        "fbp": fbp.__version__,
        "fbp_commit": commit,
        "devices": [str(d) for d in jax.devices()],
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="few repeats, for smoke tests")
    parser.add_argument("--only", default=SECTIONS, help="sections to run, e.g. a,c (default all)")
    parser.add_argument("--json", default=str(HERE / "results.json"), help="where to write results")
    parser.add_argument("--repeats", type=int, help="rounds per timing (overrides the default)")
    parser.add_argument("--memory-child", choices=("fbp", "jax"), help=argparse.SUPPRESS)
    parser.add_argument(
        "--memory-steps", type=int, default=FULL.memory_steps, help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.memory_child:
        memory_child(args.memory_child, args.memory_steps)
        return 0

    cfg = QUICK if args.quick else FULL
    if args.repeats:
        cfg = dataclasses.replace(cfg, repeats=args.repeats)
    only = [c for c in args.only.replace(",", "") if c.strip()]
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        parser.error(f"--only: unknown sections {unknown}; choose from {','.join(SECTIONS)}")

    info = machine_info()
    print(f"fbp {info['fbp']} | jax {info['jax']} | {info['cpu']} | {info['cpus_usable']} cpus")
    print(
        f"{'quick' if args.quick else 'full'} run, {cfg.repeats} rounds, sections {','.join(only)}"
    )
    start = time.perf_counter()
    rows: list[Row] = []
    details = {}
    runners = {"a": section_a, "b": section_b, "c": section_c, "d": section_d, "e": section_e}
    runners["f"] = section_f
    for section in SECTIONS:
        if section not in only:
            continue
        t0 = time.perf_counter()
        print(f"section {section} ...", flush=True)
        new_rows, details[section] = runners[section](cfg)
        rows += new_rows
        print(f"section {section} took {time.perf_counter() - t0:.1f}s", flush=True)
    total = time.perf_counter() - start
    print()
    print(table(rows))
    print(f"\n{len(rows)} rows, {sum(r.met == 'no' for r in rows)} targets missed, {total:.0f}s")

    info["load_average_end"] = os.getloadavg()
    results = {
        "machine": info,
        "config": asdict(cfg) | {"quick": args.quick, "sections": only},
        "seconds": total,
        "rows": [asdict(r) | {"met": r.met} for r in rows],
        "details": details,  # per section: raw samples, HLO op counts, memory figures
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
