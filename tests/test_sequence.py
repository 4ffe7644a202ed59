"""Sequence layers (fbp/nn/sequence.py, fbp/nn/attention.py, TransformerBlock): every hand-written
backward against jax.vjp (float64, 1e-10) and central finite differences, every forward against
an independent NumPy reference (Keras's and PyTorch's equations, loops over time), masking
semantics, the PyTorch weight mapping, Embedding's scatter-add, and fit on padded batches.

Each gradient case runs as one jitted program (forward, backward, jax.vjp and the two finite
difference points together), so a case costs one compilation. The grids are covering sets, not
Cartesian products: T = 1, 7 and 100, with and without a mask, appear for the recurrent layers,
the attention and PositionalEmbedding, with both return_sequences values, causal and not, 1 and
4 heads; Embedding (position-independent) and TransformerBlock (built from the layers tested
here and in test_nn.py) are checked at one or two lengths.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fbp
from fbp import losses, nn, optim, train
from fbp.core import ParamsError, ShapeError
from fbp.nn import (
    GRU,
    LSTM,
    Embedding,
    MultiHeadSelfAttention,
    PositionalEmbedding,
    SimpleRNN,
    TransformerBlock,
    check_ids,
    grad_norm_over_time,
    gru_from_torch,
    gru_to_torch,
    lstm_from_torch,
    lstm_to_torch,
    padding_mask,
)

F64 = jnp.float64
VJP_TOL = 1e-10
FD_H, FD_TOL = 1e-6, 1e-6
LAYERS = {"SimpleRNN": SimpleRNN, "LSTM": LSTM, "GRU": GRU}

# ------------------------------------------------------------------------------------ helpers


def _np_leaves(tree):
    return [np.asarray(a, np.float64) for a in jax.tree.leaves(tree)]


def tree_dot(a, b) -> float:
    return float(sum(np.vdot(x, y) for x, y in zip(_np_leaves(a), _np_leaves(b), strict=True)))


def tree_norm(a) -> float:
    return math.sqrt(tree_dot(a, a))


def rel_err(got, want) -> float:
    """Normwise relative error ``||got - want|| / ||want||`` over whole pytrees."""
    g, w = _np_leaves(got), _np_leaves(want)
    assert [a.shape for a in g] == [b.shape for b in w]
    num = math.sqrt(sum(float(np.sum((a - b) ** 2)) for a, b in zip(g, w, strict=True)))
    return num / max(math.sqrt(sum(float(np.sum(b**2)) for b in w)), 1e-300)


def make_params(layer, input_shape, seed=0, noise=0.3):
    """float64 params from init, perturbed so that biases and every gate block are generic."""
    _, params, state = layer.init(jax.random.key(seed), input_shape)
    rng = np.random.default_rng(seed)
    params = jax.tree.map(
        lambda a: jnp.asarray(np.asarray(a, np.float64) + noise * rng.normal(size=a.shape)),
        params,
    )
    return params, state


def make_mask(kind: str, B: int, T: int):
    """None; "end": end-padded rows; "mixed": row 0 fully masked, row 1 with holes in the
    middle, row 2 end-padded."""
    if kind == "none":
        return None
    t = np.arange(T)
    if kind == "end":
        lengths = np.array([T, max(T - 2, 1), max(T // 2, 1)])[:B]
        return jnp.asarray(t[None, :] < lengths[:, None])
    assert kind == "mixed"
    rows = [np.zeros(T, bool), (t % 3 != 1), t < (T + 1) // 2]
    return jnp.asarray(np.stack(rows[:B]))


def check_gradients(layer, params, state, x, mask=None, *, key=None, train=False, seed=1):
    """Hand-written backward vs jax.vjp (relative error <= 1e-10), and a central finite
    difference along a random direction u in (params, x): ``|fd - <g, u>| <= 1e-6 |g| |u|``.
    Returns (y, dparams, dx)."""
    has_dx = bool(jnp.issubdtype(x.dtype, jnp.floating))
    rng = np.random.default_rng(seed)
    y_shape = jax.eval_shape(
        lambda p, xx: layer.apply(p, state, xx, key=key, train=train, mask=mask), params, x
    ).shape
    dy = jnp.asarray(rng.normal(size=y_shape))
    u_p = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape)), params)
    u_x = jnp.asarray(rng.normal(size=x.shape)) if has_dx else None

    @jax.jit
    def bundle(params, x, mask, key, dy, u_p, u_x):
        def apply(p, xx):
            return layer.apply(p, state, xx, key=key, train=train, mask=mask)

        y, _, cache = layer.forward(params, state, x, key=key, train=train, mask=mask)
        mine = layer.backward(params, cache, dy)
        if has_dx:
            y_ref, vjp = jax.vjp(apply, params, x)
            ref = vjp(dy)
        else:  # integer ids have no gradient
            y_ref, vjp = jax.vjp(lambda p: apply(p, x), params)
            ref = (vjp(dy)[0], None)

        def loss_at(s):
            p = jax.tree.map(lambda a, d: a + s * d, params, u_p)
            return jnp.vdot(apply(p, x + s * u_x if has_dx else x), dy)

        return y, y_ref, mine, ref, jax.vmap(loss_at)(jnp.array([FD_H, -FD_H]))

    y, y_ref, (dparams, dx), (dparams_ref, dx_ref), (lp, lm) = bundle(
        params, x, mask, key, dy, u_p, u_x
    )
    assert jax.tree.structure(dparams) == jax.tree.structure(params)
    for g, p in zip(jax.tree.leaves(dparams), jax.tree.leaves(params), strict=True):
        assert g.shape == p.shape and g.dtype == p.dtype
    assert rel_err(y, y_ref) <= 1e-14  # one forward computation (up to rounding)
    assert rel_err(dparams, dparams_ref) <= VJP_TOL
    if has_dx:
        assert dx.shape == x.shape and dx.dtype == x.dtype
        assert rel_err(dx, dx_ref) <= VJP_TOL
    else:
        assert dx is None
    assert all(np.isfinite(g).all() for g in _np_leaves((dparams, dx)))

    fd = (float(lp) - float(lm)) / (2 * FD_H)
    analytic = tree_dot(dparams, u_p) + (tree_dot(dx, u_x) if has_dx else 0.0)
    grads, u = ((dparams, dx), (u_p, u_x)) if has_dx else (dparams, u_p)
    assert abs(fd - analytic) <= FD_TOL * tree_norm(grads) * tree_norm(u), (fd, analytic)
    return y, dparams, dx


def grads_and_ref(layer, params, x, dy, mask=None):
    """(hand-written (dparams, dx), jax.vjp's), from one jitted program."""

    @jax.jit
    def run(params, x, mask, dy):
        _, _, cache = layer.forward(params, (), x, mask=mask)
        _, vjp = jax.vjp(lambda p, xx: layer.apply(p, (), xx, mask=mask), params, x)
        return layer.backward(params, cache, dy), vjp(dy)

    return run(params, x, mask, dy)


# -------------------------------------------------------------------- NumPy references (Keras)


def sig(a):
    return 1 / (1 + np.exp(-a))


def np_rnn(cell, x, mask, h0):
    """Keras's generic loop: a masked step carries the state over, its output is the state."""
    x = np.asarray(x)
    B, T, _ = x.shape
    m = np.ones((B, T), bool) if mask is None else np.asarray(mask)
    state, outs = h0, []
    for t in range(T):
        new = cell(x[:, t], state)
        keep = m[:, t][:, None]
        state = tuple(np.where(keep, n, s) for n, s in zip(new, state, strict=True))
        outs.append(state[0])
    return np.stack(outs, 1), state[0]


def np_simple_rnn(params, x, mask):
    W, U, b = (np.asarray(params[k]) for k in ("kernel", "recurrent_kernel", "bias"))
    return np_rnn(lambda xt, s: (np.tanh(xt @ W + b + s[0] @ U),), x, mask,
                  (np.zeros((x.shape[0], U.shape[0])),))  # fmt: skip


def np_lstm(params, x, mask):
    W, U, b = (np.asarray(params[k]) for k in ("kernel", "recurrent_kernel", "bias"))
    u = U.shape[0]

    def cell(xt, s):
        h, c = s
        z = xt @ W + h @ U + b
        i, f, g, o = (
            sig(z[:, :u]),
            sig(z[:, u : 2 * u]),
            np.tanh(z[:, 2 * u : 3 * u]),
            sig(z[:, 3 * u :]),
        )
        c = f * c + i * g
        return o * np.tanh(c), c

    z0 = np.zeros((x.shape[0], u))
    return np_rnn(cell, x, mask, (z0, z0))


def np_gru(params, x, mask):
    """Keras's GRUCell.call, reset_after=True, with the kernels split per gate."""
    W, U, b = (np.asarray(params[k]) for k in ("kernel", "recurrent_kernel", "bias"))
    u = U.shape[0]
    bi, br = b[0], b[1]

    def cell(xt, s):
        h = s[0]
        x_z, x_r, x_h = (xt @ W[:, j * u : (j + 1) * u] + bi[j * u : (j + 1) * u] for j in range(3))
        r_z, r_r, r_h = (h @ U[:, j * u : (j + 1) * u] + br[j * u : (j + 1) * u] for j in range(3))
        z, r = sig(x_z + r_z), sig(x_r + r_r)
        hh = np.tanh(x_h + r * r_h)
        return (z * h + (1 - z) * hh,)

    return np_rnn(cell, x, mask, (np.zeros((x.shape[0], u)),))


NP_REF = {"SimpleRNN": np_simple_rnn, "LSTM": np_lstm, "GRU": np_gru}


# ------------------------------------------------------------------ recurrent layers: the grid

# weight_grads: "auto" picks one of the two places BPTT can sum the weight gradients, per layer;
# "other" is the one it does not pick for that layer. Both must be exact.
OTHER_MODE = {"SimpleRNN": "in_scan", "LSTM": "after_scan", "GRU": "after_scan"}

# (T, mask kind, return_sequences, weight_grads): the four code paths (with and without a mask,
# each with both output modes), T = 1, 7 and 100, and each layer's other weight_grads mode;
# T = 100 without a mask is the BPTT-over-100-steps test below. The "mixed" mask holds a fully
# masked row, a row with holes and an end-padded row.
GRID = [
    (1, "none", False, "auto"),
    (7, "none", True, "auto"),
    (7, "mixed", False, "other"),
    (100, "mixed", True, "auto"),
]


@pytest.mark.parametrize(("T", "mask_kind", "return_sequences", "weight_grads"), GRID)
@pytest.mark.parametrize("kind", ["SimpleRNN", "LSTM", "GRU"])
def test_recurrent_gradients_and_forward(kind, T, mask_kind, return_sequences, weight_grads):
    B, F, u = 3, 2, (4 if T < 100 else 3)
    mode = OTHER_MODE[kind] if weight_grads == "other" else "auto"
    layer = LAYERS[kind](u, return_sequences=return_sequences, weight_grads=mode)
    params, state = make_params(layer, (T, F), seed=T)
    x = jax.random.normal(jax.random.key(T + 1), (B, T, F), F64)
    mask = make_mask(mask_kind, B, T)
    y, _, _ = check_gradients(layer, params, state, x, mask)
    assert y.shape == ((B, T, u) if return_sequences else (B, u))
    seq_ref, last_ref = NP_REF[kind](params, x, mask)
    np.testing.assert_allclose(y, seq_ref if return_sequences else last_ref, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("kind", ["SimpleRNN", "LSTM", "GRU"])
def test_bptt_over_100_steps_is_finite_and_matches_jax_grad(kind):
    """Larger weights (the gradients may explode or vanish over 100 steps): still finite and
    equal to jax.grad of the loss sum(y) through the whole sequence."""
    B, T, F, u = 2, 100, 3, 4
    layer = LAYERS[kind](u, return_sequences=True)
    params, _ = make_params(layer, (T, F), seed=5, noise=0.8)
    x = jax.random.normal(jax.random.key(9), (B, T, F), F64)

    @jax.jit
    def both(params, x):
        _, _, cache = layer.forward(params, (), x)
        mine = layer.backward(params, cache, jnp.ones((B, T, u), F64))
        ref = jax.grad(lambda p, xx: jnp.sum(layer.apply(p, (), xx)), argnums=(0, 1))(params, x)
        return mine, ref

    mine, ref = both(params, x)
    assert all(np.isfinite(g).all() for g in _np_leaves(mine))
    assert rel_err(mine, ref) <= VJP_TOL


def test_weight_grads_auto_is_one_of_the_two_and_others_are_refused():
    for kind, layer in LAYERS.items():
        modes = {fbp.nn.sequence.AUTO_WEIGHT_GRADS[kind], OTHER_MODE[kind]}
        assert modes == {"in_scan", "after_scan"}
        with pytest.raises(ValueError, match="weight_grads must be one of"):
            layer(4, weight_grads="fused")


@pytest.mark.parametrize(
    ("kind", "xdtype"),
    [("GRU", jnp.float32), ("LSTM", jnp.float32), ("LSTM", F64)],
)
def test_float32_and_mixed_precision(kind, xdtype):
    """float32 params and input: float32 everywhere; float32 params with a float64 input:
    float64 compute, float32 param gradients and a float64 dx, as autodiff gives them. (The
    recurrent layers share the code that casts; SimpleRNN's is the LSTM's.)"""
    B, T, F, u = 2, 5, 3, 4
    layer = LAYERS[kind](u, return_sequences=True)
    _, params, _ = layer.init(jax.random.key(0), (T, F))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    x = jax.random.normal(jax.random.key(1), (B, T, F), xdtype)
    (dparams, dx), ref = grads_and_ref(layer, params, x, jnp.ones((B, T, u), xdtype))
    assert dx.dtype == xdtype
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(dparams))
    assert rel_err((dparams, dx), ref) <= (1e-5 if xdtype == jnp.float32 else 1e-7)


def test_masking_semantics_are_keras():
    """Masked steps carry the state over; return_sequences=False gives the state after the last
    real step (= running the unpadded prefix); a fully masked row gives zeros; padded inputs
    get no gradient."""
    B, T, F, u = 3, 6, 2, 3
    x = jax.random.normal(jax.random.key(0), (B, T, F), F64)
    mask = make_mask("mixed", B, T)  # row 0 empty, row 1 holes at t = 1, 4, row 2 length 3
    for kind in LAYERS:
        seq_layer, last_layer = LAYERS[kind](u, return_sequences=True), LAYERS[kind](u)
        params, _ = make_params(seq_layer, (T, F))
        ys, yl, prefix, (_, dx) = jax.jit(
            lambda p, x, m, seq_layer=seq_layer, last_layer=last_layer: (
                seq_layer.apply(p, (), x, mask=m),
                last_layer.apply(p, (), x, mask=m),
                last_layer.apply(p, (), x[2:, :3]),
                seq_layer.backward(p, seq_layer.forward(p, (), x, mask=m)[2],
                                   jnp.ones((B, T, u), F64)),
            )
        )(params, x, mask)  # fmt: skip
        np.testing.assert_array_equal(ys[0], 0)  # fully masked row: the zero state throughout
        np.testing.assert_array_equal(ys[1, 1], ys[1, 0])  # a hole repeats the previous output
        np.testing.assert_array_equal(ys[2, 3:], jnp.broadcast_to(ys[2, 2], (3, u)))
        np.testing.assert_array_equal(yl, ys[:, -1])
        np.testing.assert_allclose(yl[2:], prefix, rtol=1e-14)
        np.testing.assert_array_equal(dx[~np.asarray(mask)], 0)


@pytest.mark.parametrize(
    "layer",
    [LSTM(3), MultiHeadSelfAttention(2, causal=True)],
    ids=lambda layer: layer.name,
)
def test_a_batch_mask_means_whole_sequences(layer):
    """A (batch,) mask, as fit passes for its padded last batch, is the (batch, time) mask
    broadcast over time: same outputs, same gradients. (The recurrent layers share the code
    that reads the mask; the LSTM stands for the three.)"""
    B, T, F = 3, 4, 4
    params, _ = make_params(layer, (T, F))
    x = jax.random.normal(jax.random.key(0), (B, T, F), F64)
    rows = jnp.array([True, False, True])

    @jax.jit
    def run(m):
        y, _, cache = layer.forward(params, (), x, mask=m)
        return y, layer.backward(params, cache, jnp.ones_like(y))

    by_row, by_step = run(rows), run(jnp.broadcast_to(rows[:, None], (B, T)))
    np.testing.assert_array_equal(by_row[0], by_step[0])
    assert rel_err(by_row[1], by_step[1]) == 0.0
    with pytest.raises(ShapeError, match=r"mask should have shape \(3, 4\)"):
        layer.apply(params, (), x, mask=jnp.ones((3, 5), bool))


def test_grad_norm_over_time_shows_the_simple_rnn_vanishing_faster_than_the_lstm():
    """Per-step ||dL/dx_t|| for a loss on the last output equals autodiff's; at Keras's init the
    SimpleRNN's decays geometrically and faster than the LSTM's (run pytest -s to see them)."""
    B, T, F, u = 2, 60, 3, 8
    x = jax.random.normal(jax.random.key(3), (B, T, F), F64)
    rows = {}
    for kind in ("SimpleRNN", "LSTM"):
        layer = LAYERS[kind](u)
        _, params, _ = layer.init(jax.random.key(4), (T, F))
        params = jax.tree.map(lambda a: a.astype(F64), params)
        norms, (_, dx_ref) = jax.jit(
            lambda p, xx, layer=layer: (
                grad_norm_over_time(layer, p, xx),
                jax.vjp(lambda p, xx: layer.apply(p, (), xx), p, xx)[1](jnp.ones((B, u), F64)),
            )
        )(params, x)
        ref = np.sqrt(np.sum(np.asarray(dx_ref) ** 2, axis=(0, 2)))
        np.testing.assert_allclose(norms, ref, rtol=1e-10, atol=1e-300)
        rows[kind] = np.asarray(norms)
    print("\n  steps back  " + "  ".join(f"{k:>10}" for k in rows))
    for back in (0, 1, 2, 5, 10, 20, 40, 59):
        print(f"  {back:10d}  " + "  ".join(f"{rows[k][T - 1 - back]:10.3e}" for k in rows))
    rnn, lstm = rows["SimpleRNN"], rows["LSTM"]
    assert rnn[0] / rnn[-1] < 1e-6  # vanished over 59 steps
    assert rnn[0] / rnn[-1] < lstm[0] / lstm[-1]


def test_recurrent_init_matches_keras_defaults():
    T, F, u = 5, 3, 4
    shape, p, state = LSTM(u).init(jax.random.key(0), (T, F))
    assert shape == (u,) and state == ()
    assert p["kernel"].shape == (F, 4 * u) and p["recurrent_kernel"].shape == (u, 4 * u)
    np.testing.assert_array_equal(p["bias"], np.r_[np.zeros(u), np.ones(u), np.zeros(2 * u)])
    np.testing.assert_allclose(p["recurrent_kernel"] @ p["recurrent_kernel"].T, np.eye(u),
                               atol=1e-6)  # fmt: skip
    assert float(jnp.abs(p["kernel"]).max()) <= math.sqrt(6 / (F + 4 * u))
    shape, p, _ = GRU(u, return_sequences=True).init(jax.random.key(0), (T, F))
    assert shape == (T, u) and p["bias"].shape == (2, 3 * u)
    np.testing.assert_array_equal(p["bias"], 0)
    shape, p, _ = SimpleRNN(u).init(jax.random.key(0), (None, F))
    assert shape == (u,) and p["recurrent_kernel"].shape == (u, u)


def test_recurrent_errors_say_how_to_fix_the_call():
    layer = LSTM(4)
    params, _ = make_params(layer, (5, 3))
    with pytest.raises(ShapeError, match=r"LSTM\(4\).*\(batch, 5, 3\), got \(2, 5, 2\)"):
        layer.apply(params, (), jnp.zeros((2, 5, 2), F64))
    with pytest.raises(ShapeError, match=r"\(batch, time, 3\), got \(2, 5\)"):
        layer.apply(params, (), jnp.zeros((2, 5), F64))
    with pytest.raises(ParamsError, match="recurrent_kernel"):
        layer.apply({**params, "recurrent_kernel": jnp.zeros((4, 12))}, (), jnp.zeros((2, 5, 3)))
    with pytest.raises(TypeError, match="Embedding"):
        layer.apply(params, (), jnp.zeros((2, 5, 3), jnp.int32))
    _, _, cache = layer.forward(params, (), jnp.zeros((2, 5, 3), F64))
    with pytest.raises(ShapeError, match="dy"):
        layer.backward(params, cache, jnp.zeros((2, 5, 4), F64))
    with pytest.raises(ValueError, match="units"):
        GRU(0)


def test_recurrent_layers_run_under_vmap():
    layer = GRU(3, return_sequences=True)
    params, _ = make_params(layer, (4, 2))
    x = jax.random.normal(jax.random.key(0), (2, 4, 2), F64)
    mask = make_mask("mixed", 2, 4)

    @jax.jit
    def step(p, xx, m):
        y, _, cache = layer.forward(p, (), xx, mask=m)
        return layer.backward(p, cache, jnp.ones_like(y))

    g1 = step(params, x, mask)
    g2 = jax.vmap(step, in_axes=(None, 0, 0))(params, x[:, None], mask[:, None])
    assert rel_err(jax.tree.map(lambda a: a.sum(0), g2[0]), g1[0]) < 1e-13
    assert rel_err(g2[1][:, 0], g1[1]) < 1e-13


# ---------------------------------------------------------------------------- PyTorch mapping


def torch_lstm_np(x, w_ih, w_hh, b_ih, b_hh):
    """torch.nn.LSTM (batch_first) in NumPy: gates i, f, g, o; c' = f c + i g, h' = o tanh(c')."""
    B, T, _ = x.shape
    u = w_hh.shape[1]
    h, c, out = np.zeros((B, u)), np.zeros((B, u)), []
    for t in range(T):
        gates = x[:, t] @ w_ih.T + b_ih + h @ w_hh.T + b_hh
        i, f, g, o = (gates[:, j * u : (j + 1) * u] for j in range(4))
        c = sig(f) * c + sig(i) * np.tanh(g)
        h = sig(o) * np.tanh(c)
        out.append(h)
    return np.stack(out, 1)


def torch_gru_np(x, w_ih, w_hh, b_ih, b_hh):
    """torch.nn.GRU in NumPy: r, z, n; n = tanh(W_in x + b_in + r (W_hn h + b_hn)),
    h' = (1 - z) n + z h."""
    B, T, _ = x.shape
    u = w_hh.shape[1]
    h, out = np.zeros((B, u)), []
    for t in range(T):
        gi, gh = x[:, t] @ w_ih.T + b_ih, h @ w_hh.T + b_hh
        r, z = sig(gi[:, :u] + gh[:, :u]), sig(gi[:, u : 2 * u] + gh[:, u : 2 * u])
        n = np.tanh(gi[:, 2 * u :] + r * gh[:, 2 * u :])
        h = (1 - z) * n + z * h
        out.append(h)
    return np.stack(out, 1)


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_torch_weight_mapping(kind):
    B, T, F, u = 2, 6, 3, 4
    k = 4 if kind == "LSTM" else 3
    rng = np.random.default_rng(0)
    w_ih, w_hh = rng.normal(size=(k * u, F)), rng.normal(size=(k * u, u)) * 0.5
    b_ih, b_hh = rng.normal(size=k * u), rng.normal(size=k * u)
    x = rng.normal(size=(B, T, F))
    from_torch, to_torch, ref = {
        "LSTM": (lstm_from_torch, lstm_to_torch, torch_lstm_np),
        "GRU": (gru_from_torch, gru_to_torch, torch_gru_np),
    }[kind]
    params = from_torch(w_ih, w_hh, b_ih, b_hh)
    y = LAYERS[kind](u, return_sequences=True).apply(params, (), jnp.asarray(x))
    np.testing.assert_allclose(y, ref(x, w_ih, w_hh, b_ih, b_hh), rtol=1e-12, atol=1e-13)
    back = to_torch(params)
    if kind == "GRU":  # an exact inverse
        for a, b in zip(back, (w_ih, w_hh, b_ih, b_hh), strict=True):
            np.testing.assert_array_equal(a, b)
    else:  # the split of the bias is not unique; the model is
        np.testing.assert_array_equal(back[0], w_ih)
        np.testing.assert_array_equal(back[1], w_hh)
        np.testing.assert_allclose(back[2] + back[3], b_ih + b_hh, rtol=1e-15)
    np.testing.assert_allclose(ref(x, *map(np.asarray, back)), y, rtol=1e-12, atol=1e-13)


# ------------------------------------------------------------------- Embedding, positions


def test_embedding_scatter_adds_and_ids_have_no_gradient():
    V, D = 6, 3
    layer = Embedding(V, D)
    shape, params, _ = layer.init(jax.random.key(0), (5,))
    assert shape == (5, D) and float(jnp.abs(params["embeddings"]).max()) <= 0.05
    params = jax.tree.map(lambda a: a.astype(F64), params)
    ids = jnp.array([[1, 1, 4, 1, 0], [4, 2, 2, 1, 5]], jnp.int32)
    y, _, dx = check_gradients(layer, params, (), ids)
    assert dx is None
    np.testing.assert_array_equal(y, np.asarray(params["embeddings"])[np.asarray(ids)])
    dy = np.asarray(jax.random.normal(jax.random.key(1), y.shape, F64))
    _, _, cache = layer.forward(params, (), ids)
    dE = np.asarray(layer.backward(params, cache, jnp.asarray(dy))[0]["embeddings"])
    want = np.zeros((V, D))
    for b in range(2):
        for t in range(5):
            want[int(ids[b, t])] += dy[b, t]  # an id used n times gets the sum of n rows
    np.testing.assert_allclose(dE, want, rtol=1e-15)
    np.testing.assert_array_equal(dE[3], 0)  # an unused row


def test_embedding_out_of_range_ids_under_jit_and_check_ids():
    V, D = 4, 2
    layer = Embedding(V, D)
    _, params, _ = layer.init(jax.random.key(0), (3,))
    ids = jnp.array([[0, 4, -1]], jnp.int32)
    y = jax.jit(layer.apply)(params, (), ids)
    assert bool(jnp.isfinite(y[0, 0]).all()) and bool(jnp.isnan(y[0, 1:]).all())  # NaN rows
    _, _, cache = layer.forward(params, (), ids)
    dE = layer.backward(params, cache, jnp.ones((1, 3, D), jnp.float32))[0]["embeddings"]
    np.testing.assert_array_equal(dE, np.r_[[[1.0, 1.0]], np.zeros((3, 2))])  # bad ids dropped
    with pytest.raises(ValueError, match=r"token id 4 at position \(0, 1\)"):
        check_ids(ids, V)
    with pytest.raises(ValueError, match=r"token id -1 at position \(1, 0\)"):
        check_ids(np.array([[0, 1], [-1, 9]]), V)
    check_ids(np.array([[0, 3]]), V)
    with pytest.raises(TypeError, match="integer token ids"):
        layer.apply(params, (), jnp.zeros((1, 3), jnp.float32))
    with pytest.raises(ShapeError, match="dy"):
        layer.backward(params, cache, jnp.ones((1, 3, D + 1), jnp.float32))
    np.testing.assert_array_equal(padding_mask(jnp.array([[3, 0]])), [[True, False]])


@pytest.mark.parametrize("T", [1, 7, 100])
def test_positional_embedding(T):
    L, D, B = 100, 3, 2
    layer = PositionalEmbedding(L)
    params, state = make_params(layer, (T, D))
    x = jax.random.normal(jax.random.key(2), (B, T, D), F64)
    y, dparams, _ = check_gradients(layer, params, state, x)
    np.testing.assert_allclose(y, x + params["pos"][None, :T], rtol=1e-15)
    np.testing.assert_array_equal(dparams["pos"][T:], 0)
    with pytest.raises(ShapeError, match="max_len"):
        layer.apply(params, (), jnp.zeros((B, L + 1, D), F64))
    with pytest.raises(ShapeError, match="max_len"):
        layer.init(jax.random.key(0), (L + 1, D))


# --------------------------------------------------------------------------------- attention


def np_attention(params, x, num_heads, causal, mask):
    """Loops over batch, head and query; keys masked by ``mask`` and causality; empty rows 0."""
    p = {k: np.asarray(v) for k, v in params.items()}
    x = np.asarray(x)
    B, T, _ = x.shape
    I = p["wq"].shape[1]
    e = I // num_heads
    q, k, v = (x @ p["w" + n] + p["b" + n] for n in "qkv")
    m = np.ones((B, T), bool) if mask is None else np.asarray(mask)
    ctx = np.zeros((B, T, I))
    for b in range(B):
        for h in range(num_heads):
            sl = slice(h * e, (h + 1) * e)
            for i in range(T):
                keys = [j for j in range(T) if m[b, j] and (not causal or j <= i)]
                if keys:
                    s = k[b, keys, sl] @ q[b, i, sl] / math.sqrt(e)
                    w = np.exp(s - s.max())
                    ctx[b, i, sl] = (w / w.sum()) @ v[b, keys, sl]
    return ctx @ p["wo"] + p["bo"]


# (T, heads, causal, mask kind): every T, head count and causal x mask pair appears; T = 100
# with 4 heads, causal and padded. (End padding: the dropout test.)
ATTENTION_GRID = [
    (1, 1, False, "none"),
    (1, 4, True, "mixed"),
    (7, 1, True, "none"),
    (7, 4, False, "none"),
    (7, 1, False, "mixed"),
    (100, 4, True, "mixed"),
]


@pytest.mark.parametrize(("T", "heads", "causal", "mask_kind"), ATTENTION_GRID)
def test_attention_gradients_and_forward(T, heads, causal, mask_kind):
    B, D = 3, 8
    layer = MultiHeadSelfAttention(heads, causal=causal)
    params, state = make_params(layer, (T, D))
    x = jax.random.normal(jax.random.key(T), (B, T, D), F64)
    mask = make_mask(mask_kind, B, T)
    y, _, _ = check_gradients(layer, params, state, x, mask)
    np.testing.assert_allclose(y, np_attention(params, x, heads, causal, mask), rtol=1e-12,
                               atol=1e-13)  # fmt: skip
    if mask_kind == "mixed":  # row 0 fully masked: y = bo exactly
        np.testing.assert_array_equal(y[0], jnp.broadcast_to(params["bo"], (T, D)))


def test_attention_head_dim_and_dropout():
    B, T, D, H = 2, 5, 6, 2
    layer = MultiHeadSelfAttention(H, head_dim=4, causal=True, dropout=0.3)
    _, params, _ = layer.init(jax.random.key(0), (T, D))
    assert params["wq"].shape == (D, 8) and params["wo"].shape == (8, D)
    params, state = make_params(layer, (T, D))
    x = jax.random.normal(jax.random.key(1), (B, T, D), F64)
    mask, key = make_mask("end", B, T), jax.random.key(3)
    y_train, _, _ = check_gradients(layer, params, state, x, mask, key=key, train=True)
    plain = MultiHeadSelfAttention(H, head_dim=4, causal=True)

    @jax.jit
    def evals(p, xx, m, k):
        return (
            layer.forward(p, (), xx, key=k, train=True, mask=m)[2]["keep"],
            layer.apply(p, (), xx, mask=m),  # train=False: no dropout, key or not
            layer.apply(p, (), xx, key=k, mask=m),
            plain.apply(p, (), xx, mask=m),
        )

    keep, y_eval, y_eval_key, y_plain = evals(params, x, mask, key)
    assert 0.5 < float(keep.mean()) < 0.9  # about 1 - rate of the weights kept
    np.testing.assert_array_equal(y_eval, y_eval_key)
    np.testing.assert_array_equal(y_eval, y_plain)
    assert not np.allclose(y_train, y_eval)
    with pytest.raises(ValueError, match="needs a PRNG key"):
        layer.apply(params, (), x, train=True)
    with pytest.raises(ShapeError, match="not divisible"):
        MultiHeadSelfAttention(4).init(jax.random.key(0), (T, D))
    with pytest.raises(ShapeError, match=r"\(batch, 5, 6\), got \(2, 5, 5\)"):
        layer.apply(params, (), jnp.zeros((B, T, 5), F64))


def test_attention_fully_masked_rows_stay_finite():
    """Causal with left padding: the first queries see no real key, so P = 0 there; no NaN
    anywhere, also with scores large enough to overflow a naive exp."""
    B, T, D = 2, 4, 4
    layer = MultiHeadSelfAttention(2, causal=True)
    params, _ = make_params(layer, (T, D))
    params = {**params, "wq": params["wq"] * 300.0}
    x = jax.random.normal(jax.random.key(0), (B, T, D), F64)
    mask = jnp.array([[False, False, True, True], [False] * 4])
    y, _, cache = jax.jit(lambda p, xx, m: layer.forward(p, (), xx, mask=m))(params, x, mask)
    P = cache["P"]
    np.testing.assert_array_equal(P[0, :, :2], 0)
    np.testing.assert_array_equal(P[1], 0)
    np.testing.assert_allclose(P[0, :, 2:].sum(-1), 1, rtol=1e-14)
    got, ref = grads_and_ref(layer, params, x, jnp.ones((B, T, D), F64), mask)
    assert all(bool(jnp.isfinite(a).all()) for a in jax.tree.leaves((y, got, ref)))
    assert rel_err(got, ref) <= VJP_TOL


def test_attention_float32():
    layer = MultiHeadSelfAttention(2, causal=True)
    _, params, _ = layer.init(jax.random.key(0), (5, 4))
    x = jax.random.normal(jax.random.key(1), (2, 5, 4), jnp.float32)
    (g, dx), ref = grads_and_ref(layer, params, x, jnp.ones((2, 5, 4), jnp.float32))
    assert dx.dtype == jnp.float32 and all(a.dtype == jnp.float32 for a in jax.tree.leaves(g))
    assert rel_err((g, dx), ref) <= 1e-5


# --------------------------------------------------------------------------- TransformerBlock


@pytest.mark.parametrize(
    ("T", "causal", "mask_kind", "dropout"),
    [(7, True, "mixed", 0.0), (6, False, "end", 0.2)],
)
def test_transformer_block_gradients(T, causal, mask_kind, dropout):
    """No backward of its own: serial and residual chain the layers' hand-written ones."""
    B, D = 3, 8
    block = TransformerBlock(D, 2, 12, causal=causal, dropout=dropout)
    params, state = make_params(block, (T, D))
    x = jax.random.normal(jax.random.key(1), (B, T, D), F64)
    key = jax.random.key(2) if dropout else None
    check_gradients(block, params, state, x, make_mask(mask_kind, B, T), key=key,
                    train=bool(dropout))  # fmt: skip


def test_transformer_block_is_the_documented_composition():
    D, T = 8, 5
    block = TransformerBlock(D, 2, 12, causal=True)
    assert block.name == "TransformerBlock(8, 2, 12, causal)"
    params, state = make_params(block, (T, D))
    x = np.asarray(jax.random.normal(jax.random.key(1), (2, T, D), F64))
    (ln1, att), (ln2, d1, _, d2) = params

    def layer_norm(v, p):
        vhat = (v - v.mean(-1, keepdims=True)) / np.sqrt(v.var(-1, keepdims=True) + 1e-5)
        return vhat * np.asarray(p["scale"]) + np.asarray(p["bias"])

    h = x + np_attention(att, layer_norm(x, ln1), 2, True, None)
    a = layer_norm(h, ln2) @ np.asarray(d1["w"]) + np.asarray(d1["b"])
    gelu = a * 0.5 * (1 + np.vectorize(math.erf)(a / math.sqrt(2)))
    want = h + gelu @ np.asarray(d2["w"]) + np.asarray(d2["b"])
    np.testing.assert_allclose(block.apply(params, state, jnp.asarray(x)), want, rtol=1e-12)
    table = nn.summary(block, (T, D))  # children nested; LayerNorms 2 * 16, attention 4 * 72
    assert table.title.startswith("TransformerBlock: input (5, 8)")
    assert table.total_params == 2 * 16 + 4 * 72 + (8 * 12 + 12) + (12 * 8 + 8)
    with pytest.raises(ShapeError, match=r"\(time, 8\).*Dense\(8\)"):
        block.init(jax.random.key(0), (T, 6))


def test_equal_recipes_are_equal_layers():
    """Structural equality (fbp.core): a layer built twice from the same arguments is the same
    layer to jax.jit's cache, so fit compiles once; other arguments make another layer."""
    pairs = [
        (lambda: LSTM(8), lambda: LSTM(8, return_sequences=True)),
        (lambda: GRU(8), lambda: GRU(8, weight_grads="after_scan")),
        (lambda: SimpleRNN(8), lambda: SimpleRNN(8, "relu")),
        (lambda: Embedding(10, 4), lambda: Embedding(11, 4)),
        (lambda: PositionalEmbedding(16), lambda: PositionalEmbedding(17)),
        (lambda: MultiHeadSelfAttention(2), lambda: MultiHeadSelfAttention(2, causal=True)),
        (lambda: TransformerBlock(8, 2, 16), lambda: TransformerBlock(8, 2, 16, dropout=0.1)),
    ]
    for same, other in pairs:
        assert same() == same() and hash(same()) == hash(same())
        assert same() != other()
    assert LSTM(8) == LSTM(8, weight_grads="in_scan")  # what "auto" picks for the LSTM
    assert nn.serial(Embedding(10, 8), LSTM(8)) == nn.serial(Embedding(10, 8), LSTM(8))


# ------------------------------------------------------------- fit on padded batches


def fit_equals_unpadded_loop(net, X, y, batch_size):
    """One epoch of fit without shuffling, whose last batch is padded and masked, against
    steps on the unpadded slices; float64."""
    _, params, state = net.init(jax.random.key(0), X.shape[1:])
    params = jax.tree.map(lambda a: a.astype(F64), params)
    opt, loss = optim.sgd(0.1, momentum=0.9), losses.softmax_cross_entropy
    got, _, _, history = train.fit(net, loss, opt, params, state, (X, y), epochs=1,
                                   batch_size=batch_size, key=jax.random.key(1), shuffle=False,
                                   verbose=0)  # fmt: skip

    @jax.jit
    def step(p, s, o, x, y):
        (value, s), grads = fbp.value_and_grad(net, loss)(p, s, x, y)
        return *opt.update(grads, p, o), s, value

    p, s, o, total = params, state, opt.init(params), 0.0
    for lo in range(0, len(X), batch_size):
        hi = min(lo + batch_size, len(X))
        p, o, s, value = step(p, s, o, X[lo:hi], y[lo:hi])
        total += float(value) * (hi - lo)
    assert rel_err(got, p) <= 1e-12
    assert history["loss"][0] == pytest.approx(total / len(X), rel=1e-12)


def test_fit_an_lstm_classifier_on_a_padded_last_batch():
    X = np.asarray(jax.random.normal(jax.random.key(3), (11, 5, 2), F64))
    y = np.arange(11) % 3
    fit_equals_unpadded_loop(nn.serial(LSTM(6), nn.Dense(3)), X, y, batch_size=4)


def test_fit_a_transformer_on_tokens_with_a_padded_last_batch():
    """(batch, time) token ids in, (batch, time, vocab) logits out, (batch, time) labels: fit's
    (batch,) mask reaches the attention and the loss's mean over tokens."""
    V, T = 7, 6
    net = nn.serial(Embedding(V, 8), PositionalEmbedding(T), TransformerBlock(8, 2, 16, causal=True),
                    nn.LayerNorm(), nn.Dense(V))  # fmt: skip
    X = np.asarray(jax.random.randint(jax.random.key(4), (10, T), 0, V))
    fit_equals_unpadded_loop(net, X, np.roll(X, -1, axis=1), batch_size=4)
