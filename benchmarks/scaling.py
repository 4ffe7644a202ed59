"""Data-parallel scaling: the same ``fit`` on 1, 2, 4, ... devices, and the all-reduce's share.

    python benchmarks/scaling.py                    # 1, 2 and 4 devices, about 2 minutes on 2 cores
    python benchmarks/scaling.py --devices 1,2,4,8  # on a machine with 8 accelerators
    python benchmarks/scaling.py --quick            # smoke test

Each configuration runs in its own subprocess (``--child N``), because JAX's CPU device count
must be set before JAX starts: on a CPU-only machine, N simulated devices share the same cores,
so they cannot be faster; the numbers show the overhead of splitting the batch. On a machine
with accelerators the first N of them are used. Per configuration:

- ``fit``: examples per second over ``--epochs`` epochs of ``fit(..., mesh=...)`` (compiled
  beforehand; data and params placed on the mesh beforehand), and ms per step. "1, no mesh" is
  the plain single-device program (``mesh=None``).
- all-reduce: what XLA's compiled epoch program sums across devices per step (op count and
  bytes, from its HLO), and its share of the step's time, measured on the same per-device step
  run two ways under ``jax.shard_map``: with the gradient all-reduce (``pmean``) and without it;
  share = (with - without) / with. The two programs are timed in turn, A, B, A, B, ...

The network is an MLP 784-512-512-10 (relu), batch 256 (the global batch), Adam, on the
bundled MNIST images tiled to ``--examples`` rows. Results go to benchmarks/scaling.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
from bench import interleaved, machine_info, mnist_60k
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import fbp
from fbp import losses, nn, optim, train

HERE = Path(__file__).resolve().parent
HIDDEN, BATCH = [512, 512], 256
DTYPE_BYTES = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s64": 8, "pred": 1}


def all_reduce_traffic(hlo: str) -> tuple[int, int]:
    """``(ops, bytes)`` of the all-reduces in a compiled module's text (operand sizes summed)."""
    ops, total = 0, 0
    for line in hlo.splitlines():
        m = re.search(r"= (.*?) all-reduce(?:-start)?\(", line)
        if not m:
            continue
        ops += 1
        for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", m.group(1)):
            size = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
            total += size * DTYPE_BYTES.get(dtype, 4)
    return ops, total


def child(n: int, examples: int, epochs: int, repeats: int, steps: int) -> dict:
    """One configuration, in a fresh process: ``n`` devices (0: one device without a mesh)."""
    jax.config.update("jax_num_cpu_devices", max(n, 1))  # before JAX starts; only CPUs read it
    loss, opt = losses.softmax_cross_entropy, optim.adam(1e-3)
    X, y = mnist_60k()
    reps = -(-examples // X.shape[0])
    X, y = np.tile(X, (reps, 1))[:examples], np.tile(y, reps)[:examples]
    net = nn.mlp([*HIDDEN, 10])
    _, params, state = net.init(jax.random.key(0), (784,))
    devices = jax.devices()[: max(n, 1)]
    mesh = jax.make_mesh((len(devices),), ("data",), devices=devices) if n else None
    if mesh is not None:  # on the mesh beforehand, so fit's timing is the epochs alone
        X, y, params, state = jax.device_put((X, y, params, state), NamedSharding(mesh, P()))
    else:
        X, y = jax.device_put((X, y))
    kw = dict(batch_size=BATCH, key=jax.random.key(1), verbose=0, mesh=mesh)
    train.fit(net, loss, opt, params, state, (X, y), epochs=1, **kw)  # compile

    def run_fit() -> float:
        t0 = time.perf_counter()
        out = train.fit(net, loss, opt, params, state, (X, y), epochs=epochs, **kw)
        jax.block_until_ready(out[:3])
        return time.perf_counter() - t0

    fit_s = float(np.median([run_fit() for _ in range(repeats)]))
    n_steps = epochs * -(-examples // BATCH)
    result = {
        "devices": len(devices),
        "mesh": mesh is not None,
        "platform": devices[0].platform,
        "device_kind": devices[0].device_kind,
        "examples_per_s": epochs * examples / fit_s,
        "fit_ms_per_step": 1e3 * fit_s / n_steps,
    }
    if mesh is None:
        return result

    # What XLA all-reduces in fit's compiled epoch (the gradients, the loss, the example count).
    dp = train._data_parallel("scaling", mesh, "data", BATCH)
    opt_state = jax.device_put(opt.init(params), dp.replicated)
    order = train._epoch_order([0], 0, examples, BATCH, True)
    with jax.set_mesh(mesh):
        hlo = (
            train._run_epoch.lower(
                params, state, opt_state, X, y, order, jax.random.key(1), 0, np.float32(0),
                net=net, loss=loss, optimizer=opt, batch_size=BATCH, metric_fns=(),
                progress=False, unroll=1, split=dp.batch,
            ).compile().as_text()
        )  # fmt: skip
    result["all_reduce_ops"], result["all_reduce_bytes_per_step"] = all_reduce_traffic(hlo)

    # The per-device step with and without the gradient all-reduce.
    def local_step(params, opt_state, x, t, reduce):
        value, grads, _, _ = fbp.forward_backward(net, loss, params, state, x, t)
        if reduce:
            grads = jax.lax.pmean(grads, "data")  # the mean over the devices' batches
        params, opt_state = opt.update(grads, params, opt_state)
        return params, opt_state, value

    def program(reduce: bool):
        mapped = jax.shard_map(
            functools.partial(local_step, reduce=reduce),
            mesh=mesh,
            in_specs=(P(), P(), P("data"), P("data")),
            out_specs=(P(), P(), P()),
            check_vma=False,  # without the all-reduce the devices' params differ: timing only
        )
        return jax.jit(mapped, donate_argnums=(0, 1))

    xb = jax.device_put(np.asarray(X[:BATCH]), dp.batch)
    tb = jax.device_put(np.asarray(y[:BATCH]), dp.batch)
    carries = {}

    def sampler(reduce: bool):
        step = program(reduce)
        carries[reduce] = (jax.tree.map(lambda a: a.copy(), params), opt.init(params))
        carries[reduce] = jax.device_put(carries[reduce], dp.replicated)
        with jax.set_mesh(mesh):
            p, o, _ = step(*carries[reduce], xb, tb)  # compile
        carries[reduce] = (p, o)

        def sample() -> float:
            p, o = carries[reduce]
            t0 = time.perf_counter()
            with jax.set_mesh(mesh):
                for _ in range(steps):
                    p, o, value = step(p, o, xb, tb)
            jax.block_until_ready((p, o, value))
            carries[reduce] = (p, o)
            return (time.perf_counter() - t0) / steps

        return sample

    t = interleaved({"with": sampler(True), "without": sampler(False)}, repeats)
    with_ms, without_ms = 1e3 * np.median(t["with"]), 1e3 * np.median(t["without"])
    result.update(
        step_ms_with_all_reduce=with_ms,
        step_ms_without=without_ms,
        all_reduce_share=(with_ms - without_ms) / with_ms,
    )
    return result


def table(results: list[dict]) -> str:
    base = results[0]["examples_per_s"]
    lines = [
        "| devices | examples/s | vs 1, no mesh | ms/step (fit) | all-reduce per step | "
        "step with / without all-reduce | all-reduce share |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        name = f"{r['devices']}" + ("" if r["mesh"] else ", no mesh")
        if "all_reduce_ops" in r:
            traffic = f"{r['all_reduce_ops']} ops, {r['all_reduce_bytes_per_step'] / 2**20:.2f} MiB"
            steps = f"{r['step_ms_with_all_reduce']:.2f} / {r['step_ms_without']:.2f} ms"
            share = f"{100 * r['all_reduce_share']:.0f}%"
        else:
            traffic = steps = share = "-"
        lines.append(
            f"| {name} | {r['examples_per_s']:,.0f} | {r['examples_per_s'] / base:.2f}x | "
            f"{r['fit_ms_per_step']:.2f} | {traffic} | {steps} | {share} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", default="1,2,4", help="device counts (default: 1,2,4)")
    parser.add_argument("--examples", type=int, default=20_000, help="training rows")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per fit timing")
    parser.add_argument("--repeats", type=int, default=5, help="timings per configuration")
    parser.add_argument("--steps", type=int, default=20, help="steps per step timing")
    parser.add_argument("--quick", action="store_true", help="small and few: a smoke test")
    parser.add_argument("--json", default=str(HERE / "scaling.json"), help="where to write")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.examples, args.epochs, args.repeats, args.steps = 2048, 1, 1, 3
    sizes = (args.examples, args.epochs, args.repeats, args.steps)
    if args.child is not None:
        print(json.dumps(child(args.child, *sizes)))
        return 0

    counts = [0] + [int(c) for c in args.devices.split(",")]  # 0: one device, no mesh
    results = []
    for n in counts:
        cmd = [sys.executable, __file__, "--child", str(n), "--examples", str(args.examples),
               "--epochs", str(args.epochs), "--repeats", str(args.repeats),
               "--steps", str(args.steps)]  # fmt: skip
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        if run.returncode != 0:
            print(run.stderr[-3000:], file=sys.stderr)
            return 1
        results.append(json.loads(run.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    print()
    print(table(results))
    info = machine_info()
    info.pop("devices", None)  # this parent process's, not the children's
    Path(args.json).write_text(
        json.dumps({"machine": info, "config": vars(args), "results": results}, indent=2) + "\n"
    )
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
