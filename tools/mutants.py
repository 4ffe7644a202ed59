"""Plant one bug at a time in a copy of fbp and check that the test suite catches it.

    python tools/mutants.py                 # every mutant, each against the tests named for it
    python tools/mutants.py --list          # the mutants
    python tools/mutants.py dropout-keys-ignore-epoch leaky-relu-kink   # some of them
    python tools/mutants.py --all-tests NAME    # a mutant against the whole suite

Each mutant is one text substitution in one file: the original text (which must occur exactly
once: a mutant that no longer applies is reported STALE, so this list cannot rot silently) and
the planted one. The repository is copied to a temporary directory, the bug planted there, and
pytest run on the mutant's tests with ``-x``; the mutant is KILLED if pytest fails, SURVIVED if
it passes. The script exits 1 if any mutant survived or went stale. See tests/README.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRID = "tests/test_sequence.py::test_recurrent_gradients_and_forward"  # the recurrent layers


class Mutant(NamedTuple):
    file: str
    original: str
    planted: str
    tests: tuple[str, ...]  # pytest node ids or files that must catch it


MUTANTS: dict[str, Mutant] = {
    # The six the audit found surviving.
    "shuffle-ignores-epoch": Mutant(
        "fbp/train.py",
        "np.random.default_rng([*seed, epoch])",
        "np.random.default_rng([*seed])",
        (
            "tests/test_train.py::test_two_epochs_equal_a_hand_rolled_loop_with_shuffling_dropout_"
            "and_the_partial_batch",
        ),
    ),
    "dropout-keys-ignore-epoch": Mutant(
        "fbp/train.py",
        "drop_key = jax.random.fold_in(key, epoch)",
        "drop_key = key",
        (
            "tests/test_train.py::test_two_epochs_equal_a_hand_rolled_loop_with_shuffling_dropout_"
            "and_the_partial_batch",
        ),
    ),
    "count-wraps-at-int32-max": Mutant(
        "fbp/optim.py",
        "jnp.where(count < _INT32_MAX, count + 1, count)",
        "count + 1",
        ("tests/test_optim.py::test_count_saturates_at_the_int32_maximum",),
    ),
    "check-ignores-fd-verdict": Mutant(
        "fbp/check.py",
        "grad_ok and fd_ok,",
        "grad_ok,",
        (
            "tests/test_check.py::test_finite_differences_alone_catch_a_bug_the_autodiff_reference_"
            "shares",
        ),
    ),
    "leaky-relu-kink": Mutant(
        "fbp/nn/activations.py",
        "return jnp.where(y > 0, dy, negative_slope * dy)",
        "return jnp.where(y >= 0, dy, negative_slope * dy)",
        ("tests/test_nn.py::test_derivative_at_zero_and_minus_zero_is_the_documented_one",),
    ),
    "io-no-entry-dtype-shape-check": Mutant(
        "fbp/io.py",
        '            if dtype.newbyteorder("<") != want.newbyteorder("<") or stored_shape != shape:',
        "            if False:",
        ("tests/test_io.py",),
    ),
    # References and verdicts (the verification issue).
    "elu-reference-splits-the-tie": Mutant(
        "fbp/nn/activations.py",
        "negative = jnp.where(x > 0, jnp.zeros_like(x), x)",
        "negative = jnp.minimum(x, 0)",
        (
            "tests/test_check.py::test_kinks_elu_at_zero_and_a_zero_initialised_logistic_"
            "regression_pass",
        ),
    ),
    "bce-reference-with-max-and-abs": Mutant(
        "fbp/losses.py",
        "return jnp.logaddexp(x, 0.0) - _mul_where_nonzero(t, x)",
        "return jnp.maximum(x, 0.0) - _mul_where_nonzero(t, x) + jnp.log1p(jnp.exp(-jnp.abs(x)))",
        (
            "tests/test_losses.py::test_a_zero_initialised_logistic_regression_gets_the_true_"
            "gradient_through_autodiff",
        ),
    ),
    "mae-reference-with-abs": Mutant(
        "fbp/losses.py",
        "return d * jnp.sign(d)",
        "return jnp.abs(d)",
        ("tests/test_losses.py",),
    ),
    "check-without-scale-floor": Mutant(
        "fbp/check.py",
        "rel_err = abs_err / max(_max_abs(ref), floor * s_max, _TINY)",
        "rel_err = abs_err / max(_max_abs(ref), _TINY)",
        ("tests/test_check.py::test_saturated_softmax_with_gradients_of_1e_minus_28_passes",),
    ),
    # Backward passes.
    "dense-db-not-summed": Mutant(
        "fbp/nn/dense.py",
        "db = dy2.sum(0)  # (out,)",
        "db = dy2[0]  # (out,)",
        ("tests/test_nn.py",),
    ),
    "batchnorm-forgets-the-mean-term": Mutant(
        "fbp/nn/normalization.py",
        "return r * (g - weight * sum_g - weight * xhat * sum_gx)",
        "return r * (g - weight * xhat * sum_gx)",
        ("tests/test_nn.py",),
    ),
    "batchnorm-mask-ignored": Mutant(
        "fbp/nn/normalization.py",
        "            if mask is None:\n                n = math.prod",
        "            if True:\n                n = math.prod",
        ("tests/test_nn.py::test_batchnorm_with_a_mask_sees_only_the_real_rows",),
    ),
    "fanout-keeps-one-branch": Mutant(
        "fbp/nn/combinators.py",
        "dx = dx + dy  # the fork: gradients of every use add up",
        "dx = dx",
        ("tests/test_nn.py",),
    ),
    "residual-drops-the-skip-path": Mutant(
        "fbp/nn/combinators.py",
        "return dparams, dy + dx_layer  # skip path + layer path",
        "return dparams, dx_layer",
        ("tests/test_nn.py",),
    ),
    "conv-dx-kernel-not-flipped": Mutant(
        "fbp/nn/conv.py",
        "w_t = lax.rev(w, tuple(range(n)))  # (*k, Cin/G, F): flipped in space",
        "w_t = w  # (*k, Cin/G, F): flipped in space",
        ("tests/test_conv.py",),
    ),
    "maxpool-tie-to-the-last": Mutant(
        "fbp/nn/conv.py",
        "for o in reversed(range(count - 1)):",
        "for o in range(count - 1):",
        ("tests/test_conv.py",),
    ),
    # Sequence layers: backpropagation through time and attention.
    "lstm-forget-gate-off-the-cell-path": Mutant(
        "fbp/nn/sequence.py",
        "dc_prev = dct * f  # (B, u)",
        "dc_prev = dct  # (B, u)",
        (GRID,),
    ),
    "lstm-masked-step-drops-dc": Mutant(
        "fbp/nn/sequence.py",
        "                dc_prev = jnp.where(m_t, dc_prev, dc)\n",
        "",
        (GRID,),
    ),
    "simple-rnn-masked-step-drops-dh": Mutant(
        "fbp/nn/sequence.py",
        "dh_prev = jnp.where(m_t, dh_prev, g)  # ... and passes g through",
        "dh_prev = dh_prev",
        (GRID,),
    ),
    "gru-no-direct-path": Mutant(
        "fbp/nn/sequence.py",
        "dh_prev = g * z + dhp @ U.T  # (B, u)",
        "dh_prev = dhp @ U.T  # (B, u)",
        (GRID,),
    ),
    "gru-reset-gate-missing-from-dU": Mutant(
        "fbp/nn/sequence.py",
        "dhp = jnp.concatenate([daz, dar, dan * r], axis=1)  # (B, 3u)",
        "dhp = jnp.concatenate([daz, dar, dan], axis=1)  # (B, 3u)",
        (GRID,),
    ),
    "bptt-after-scan-dU-from-da": Mutant(
        "fbp/nn/sequence.py",
        "dU = _sum_outer(hprev, dhp, U0)  # (u, k u)",
        "dU = _sum_outer(hprev, da, U0)  # (u, k u)",
        (GRID,),
    ),
    "gru-bias-rows-swapped": Mutant(
        "fbp/nn/sequence.py",
        "db = jnp.stack([db_x, db_h]) if split_bias else db_x",
        "db = jnp.stack([db_h, db_x]) if split_bias else db_x",
        (GRID,),
    ),
    "sequence-batch-mask-ignored": Mutant(
        "fbp/nn/_base.py",
        "return jnp.broadcast_to(mask[:, None], (batch, time)) if mask.ndim == 1 else mask",
        "return None if mask.ndim == 1 else mask",
        ("tests/test_sequence.py::test_a_batch_mask_means_whole_sequences",),
    ),
    "attention-softmax-no-row-sum": Mutant(
        "fbp/nn/attention.py",
        "dS = P * (dP - jnp.sum(dP * P, axis=-1, keepdims=True))  # (B, H, T, T)",
        "dS = P * dP  # (B, H, T, T)",
        ("tests/test_sequence.py::test_attention_gradients_and_forward",),
    ),
    "attention-dropout-not-in-backward": Mutant(
        "fbp/nn/attention.py",
        "dP = dPd if keep is None else jnp.where(keep, dPd * (1.0 / (1.0 - dropout)), 0)",
        "dP = dPd",
        ("tests/test_sequence.py::test_attention_head_dim_and_dropout",),
    ),
    "embedding-scatter-sets": Mutant(
        "fbp/nn/sequence.py",
        "dE = jnp.zeros_like(E).at[rows].add(dy,",
        "dE = jnp.zeros_like(E).at[rows].set(dy,",
        ("tests/test_sequence.py::test_embedding_scatter_adds_and_ids_have_no_gradient",),
    ),
    "embedding-bad-id-reads-row-0": Mutant(
        "fbp/nn/sequence.py",
        "y = jnp.where(valid[..., None], rows, jnp.nan)  # a bad id reads a row of NaN",
        "y = rows",
        ("tests/test_sequence.py::test_embedding_out_of_range_ids_under_jit_and_check_ids",),
    ),
    "positions-averaged-over-the-batch": Mutant(
        "fbp/nn/sequence.py",
        "jnp.sum(dy, axis=0).astype(pos.dtype)",
        "jnp.mean(dy, axis=0).astype(pos.dtype)",
        ("tests/test_sequence.py::test_positional_embedding",),
    ),
    "loss-mask-ignored": Mutant(
        "fbp/losses.py",
        "scale = 1.0 / n if w is None else w / n  # d mean / d l_i = 1/n on counted entries",
        "scale = 1.0 / n",
        ("tests/test_losses.py",),
    ),
    "fit-padding-not-masked": Mutant(
        "fbp/train.py",
        "padded = n % batch_size != 0  # static: only then is any batch masked",
        "padded = False",
        ("tests/test_train.py::test_padded_last_batch_with_batchnorm_equals_the_unpadded_step",),
    ),
    "labels-not-checked": Mutant(
        "fbp/train.py",
        '        check_labels(np.asarray(y), out[-1], f"{where}: y")',
        "        pass",
        ("tests/test_errors.py",),
    ),
    "backup-not-restored": Mutant(
        "fbp/train.py",
        "        restored = _read_backup(backup, identity, params, state, optimizer)",
        "        restored = None",
        ("tests/test_train.py::test_a_run_interrupted_after_a_backup_resumes_to_the_same_bits",),
    ),
    "fit-padded-count-off-by-one": Mutant(
        "fbp/train.py",
        "else jnp.minimum(n - i * batch_size, batch_size)",
        "else jnp.minimum(n - i * batch_size, batch_size - 1)",
        ("tests/test_train.py::test_padded_last_batch_with_batchnorm_equals_the_unpadded_step",),
    ),
    "finite-test-first-dtype-only": Mutant(
        "fbp/train.py",
        "for v in by_dtype.values()]",
        "for v in by_dtype.values()][:1]",
        ("tests/test_train.py::test_the_finiteness_test_sees_every_leaf_of_every_dtype",),
    ),
    "init-split-keys-reversed": Mutant(
        "fbp/initializers.py",
        "    return tuple(jax.random.split(key, n))",
        "    return tuple(jax.random.split(key, n))[::-1]",
        ("tests/test_initializers.py::test_split_gives_jax_random_splits_keys",),
    ),
    "init-truncated-draw-unscaled": Mutant(
        "fbp/initializers.py",
        "flat = a * jax.random.truncated_normal(key, -2.0, 2.0, n, dtype)",
        "flat = jax.random.truncated_normal(key, -2.0, 2.0, n, dtype)",
        ("tests/test_initializers.py",),
    ),
}


def run(name: str, mutant: Mutant, all_tests: bool) -> str:
    with tempfile.TemporaryDirectory(prefix=f"fbp-mutant-{name}-") as tmp:
        for part in ("fbp", "tests", "examples", "README.md", "pyproject.toml", ".ci"):
            src = os.path.join(ROOT, part)
            if os.path.isdir(src):
                shutil.copytree(src, os.path.join(tmp, part), ignore=shutil.ignore_patterns(
                    "__pycache__"))  # fmt: skip
            elif os.path.exists(src):
                shutil.copy(src, tmp)
        path = os.path.join(tmp, mutant.file)
        with open(path) as f:
            text = f.read()
        if text.count(mutant.original) != 1:
            return "STALE"
        with open(path, "w") as f:
            f.write(text.replace(mutant.original, mutant.planted))
        env = {**os.environ, "PYTHONPATH": tmp}
        tests = ["tests"] if all_tests else list(mutant.tests)
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
            cwd=tmp, env=env, capture_output=True, text=True, check=False,
        )  # fmt: skip
        return "KILLED" if proc.returncode != 0 else "SURVIVED"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help="mutants to run (default: all)")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--all-tests", action="store_true", help="run the whole suite per mutant")
    args = parser.parse_args()
    if args.list:
        for name, m in MUTANTS.items():
            print(f"{name:34} {m.file}")
        return 0
    unknown = [n for n in args.names if n not in MUTANTS]
    if unknown:
        parser.error(f"unknown mutants {unknown}; see --list")
    bad = 0
    for name in args.names or list(MUTANTS):
        t0 = time.perf_counter()
        verdict = run(name, MUTANTS[name], args.all_tests)
        bad += verdict != "KILLED"
        print(f"{verdict:8} {name:34} ({time.perf_counter() - t0:.0f}s)", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
