"""Sequence layers with hand-written backward passes: Embedding, PositionalEmbedding and the
Keras-3-compatible recurrent layers SimpleRNN, LSTM and GRU (BPTT written out by hand).

Shapes: ``B`` batch, ``T`` time, ``F`` input features, ``u`` units, ``k`` gates (1 SimpleRNN,
4 LSTM, 3 GRU). Inputs are batch-major ``(B, T, F)`` as in Keras; inside, the recurrences run
time-major (``lax.scan`` over the leading axis of ``(T, B, .)`` arrays).

Recurrent layers, common structure
----------------------------------
Forward::

    xp_t = x_t W + b                      (B, k u)   all steps at once, one matmul, before the scan
    a_t  = xp_t + h_{t-1} U               (B, k u)   inside the scan: only the recurrent matmul
    (h_t, c_t) = cell(a_t, h_{t-1}, c_{t-1})

Backward (BPTT): a reverse ``lax.scan`` carries ``dh = dL/dh_t`` (and ``dc = dL/dc_t`` for the
LSTM) from ``t = T-1`` down to 0; at each step ``g_t = dh + dy_t`` (``dy_t = 0`` without
``return_sequences``; without it ``dy`` seeds the carry instead) and the cell's local backward
gives the gate pre-activation gradients ``da_t`` (B, k u) and ``dh_{t-1} = da_t U^T (+ direct
terms)``. The weight gradients::

    dW = sum_t x_t^T da_t        (F, k u)      dU = sum_t h_{t-1}^T da_t     (u, k u)
    db = sum_{t,b} da_t          (k u,)        dx_t = da_t W^T               (B, F)

are summed either in the scan carry (``weight_grads="in_scan"``) or as single 2-D matmuls over
all ``T B`` rows after the scan, from the saved ``da`` (``"after_scan"``); both give the same
numbers up to summation order. ``"auto"`` (the default) picks the one measured faster on the
2-core CPU fbp is developed on: in_scan for LSTM and GRU, after_scan for SimpleRNN (see
:data:`AUTO_WEIGHT_GRADS` for the ratios). On an accelerator the large matmuls of after_scan
may win: measure there.

Masking (Keras 3 semantics, ``keras/src/backend/jax/rnn.py`` with ``zero_output_for_mask=False``,
the default of ``LSTM``/``GRU``/``SimpleRNN``): ``mask`` is ``(B, T)``, True at real steps, or
``(B,)``, which marks whole sequences (``fit``'s padded last batch: a False row is all padding)
and is broadcast over time. At a masked step the state is carried over unchanged, ``h_t =
h_{t-1}`` (``c_t = c_{t-1}``), and the output at that step is that carried-over state (the
previous output; zeros before the first real step, from the zero initial state).
``return_sequences=False`` returns the final state, i.e. the state after the last real step
(zeros for a fully masked row). In the backward a masked step passes ``g_t`` (and ``dc``)
straight through to step ``t-1`` and gets zero gate gradient, so its input ``x_t`` gets zero
gradient. (Keras's cuDNN path on the TensorFlow backend instead emits zeros at the padded,
right-padded-only, steps; the generic loop used by the JAX backend carries the previous output
over, as here.)

Initial state: zeros. Defaults as Keras 3: ``kernel`` glorot_uniform, ``recurrent_kernel``
orthogonal, ``bias`` zeros (LSTM: ``unit_forget_bias``, forget block 1). Params use Keras's
names and layouts, so a Keras layer's weights load as they are::

    params = dict(zip(["kernel", "recurrent_kernel", "bias"], keras_layer.get_weights()))

(and see :func:`lstm_from_torch`, :func:`gru_from_torch` for PyTorch's layouts).

Dtypes: the computation runs in ``promote(x.dtype, kernel.dtype)`` with explicit casts (so it
works under ``jax_numpy_dtype_promotion="strict"``); param gradients come back in the params'
dtype and ``dx`` in ``x``'s dtype, as autodiff gives them.
"""

from __future__ import annotations

from collections.abc import Callable
from types import MappingProxyType

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fbp import initializers
from fbp.core import Array, Layer, PyTree, ShapeError, check_shape, check_tree
from fbp.nn._base import check_dy, grad_sharding, like_batch, sequence_mask

# ------------------------------------------------------------------------------------ helpers

_UNROLL = 1  # lax.scan unroll of both recurrences; 2, 4, 7: 1.00x, 1.01x, 1.14x the time (CPU)

WEIGHT_GRADS_MODES = ("auto", "in_scan", "after_scan")
AUTO_WEIGHT_GRADS = MappingProxyType(
    {"SimpleRNN": "after_scan", "LSTM": "in_scan", "GRU": "in_scan"}
)
"""What ``weight_grads="auto"`` means per layer: the faster of the two on a 2-core CPU. The time
of fbp's whole train step (the layer with 128 units, then Dense(10), cross-entropy and Adam; B
128, T 28, F 28) with in_scan over its time with after_scan measured 0.61-0.91 for the LSTM,
0.91-1.0 for the GRU and 1.0-1.15 for the SimpleRNN over five runs (``python
benchmarks/bench.py --only f`` prints these rows)."""


def _weight_grads(name: str, weight_grads: str) -> str:
    if weight_grads not in WEIGHT_GRADS_MODES:
        raise ValueError(
            f"{name}: weight_grads must be one of {WEIGHT_GRADS_MODES}, got {weight_grads!r}."
        )
    return AUTO_WEIGHT_GRADS[name] if weight_grads == "auto" else weight_grads


def _check_state(name: str, state: PyTree) -> None:
    check_tree(name, "state", state, (), "This layer has no state: pass ().")


def _rows(params: PyTree, key: str) -> int:
    """``params[key].shape[0]`` if there is such a leaf (else 1; check_tree then reports)."""
    try:
        return int(params[key].shape[0])
    except (TypeError, KeyError, IndexError, AttributeError):
        return 1


def _cols(params: PyTree, key: str) -> int:
    """``params[key].shape[-1]`` if there is such a leaf (else 1; check_tree then reports)."""
    try:
        return int(params[key].shape[-1])
    except (TypeError, KeyError, IndexError, AttributeError):
        return 1


def _compute_dtype(x: Array, w: Array) -> np.dtype:
    """The dtype both are cast to: numpy's promotion (explicit casts pass the strict mode)."""
    return np.promote_types(x.dtype, w.dtype)


def _check_input(name: str, x: Array, features: int) -> None:
    """A floating-point (batch, time, features) input; trace-time errors say how to fix it."""
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"{name}: the input should be a floating-point array (batch, time, {features}), "
            f"got dtype {x.dtype}. Token ids go through an Embedding layer first."
        )
    if x.ndim != 3:
        raise ShapeError(
            f"the input should have shape (batch, time, {features}), got {tuple(x.shape)}. "
            f"Sequence layers take (batch, time, features); add the missing axis "
            f"(e.g. x[:, :, None] for one feature per step).",
            layer=name,
        )


def _time_mask(name: str, mask: Array | None, x_shape: tuple) -> Array | None:
    """A ``(B, T)`` or ``(B,)`` mask as time-major ``(T, B, 1)`` booleans (or None)."""
    mask = sequence_mask(name, mask, *x_shape[:2])  # (B, T)
    return None if mask is None else jnp.transpose(mask)[:, :, None]  # (T, B, 1)


# Activations for SimpleRNN: (f, f' written as a function of the output y = f(a)).
_ACTIVATIONS: dict[str, tuple[Callable[[Array], Array], Callable[[Array], Array]]] = {
    "tanh": (jnp.tanh, lambda y: 1 - y * y),
    "sigmoid": (jax.nn.sigmoid, lambda y: y * (1 - y)),
    "relu": (jax.nn.relu, lambda y: (y > 0).astype(y.dtype)),  # relu'(0) := 0, as autodiff
    "linear": (lambda a: a, lambda y: jnp.ones_like(y)),
}


def _recurrent_init(name: str, units: int, k: int, bias_init: Callable, dtype):
    """Shared ``init`` of the recurrent layers: Keras's shapes and default initializers."""

    def init(key, input_shape, return_sequences):
        input_shape = tuple(input_shape)
        if len(input_shape) != 2:
            raise ShapeError(
                f"input_shape should be (time, features) (without the batch axis), got "
                f"{input_shape}.",
                layer=name,
            )
        time, features = input_shape
        k_w, k_u = initializers.split(key)
        params = {
            "kernel": initializers.glorot_uniform(k_w, (features, k * units), dtype),
            "recurrent_kernel": initializers.orthogonal()(k_u, (units, k * units), dtype),
            "bias": bias_init(dtype),
        }
        out_shape = (time, units) if return_sequences else (units,)
        return out_shape, params, ()

    return init


def _recurrent_check(name, params, state, x, units, k, bias_shape):
    """Trace-time checks shared by the recurrent layers; returns F (input features)."""
    features = _rows(params, "kernel")
    want = {
        "kernel": (features, k * units),
        "recurrent_kernel": (units, k * units),
        "bias": bias_shape,
    }
    check_tree(name, "params", params, want)
    _check_state(name, state)
    _check_input(name, x, features)
    check_shape(
        name,
        "the input",
        (None, x.shape[1], features),
        x.shape,
        f"This layer was initialized for {features} input features: pass x of shape "
        f"(batch, time, {features}), or re-run init with input_shape "
        f"{tuple(x.shape[1:])}.",
    )
    return features


def _outputs(hprev: Array, h_last: Array, return_sequences: bool) -> Array:
    """The layer output from the scan's per-step ``h_{t-1}`` (T, B, u) and final ``h_T``."""
    if not return_sequences:
        return h_last  # (B, u)
    hs = jnp.concatenate([hprev[1:], h_last[None]], axis=0)  # h_0..h_{T-1}: (T, B, u)
    return jnp.transpose(hs, (1, 0, 2))  # (B, T, u)


def _dy_seed(name, dy, cache_shape, units, return_sequences, dtype):
    """Split dy into (initial dh carry (B, u), per-step dy (T, B, u) or None)."""
    T, B = cache_shape[:2]
    if return_sequences:
        check_dy(name, (B, T, units), dy)
        dh0 = jnp.zeros((B, units), dtype, out_sharding=like_batch(dy, 2))  # split as dy
        return dh0, jnp.transpose(dy.astype(dtype), (1, 0, 2))
    check_dy(name, (B, units), dy)
    return dy.astype(dtype), None


def _flat(a: Array) -> Array:
    """(T, B, n) -> (T B, n): a free reshape of a time-major array."""
    return a.reshape(-1, a.shape[-1])


def _project(xt: Array, W: Array) -> Array:
    """``x_t W`` for all steps as ONE plain 2-D matmul: (T, B, F) @ (F, n) -> (T, B, n).

    (Written as ``einsum("btf,fg->tbg")`` instead, XLA:CPU picks a transposed output layout
    and a slow dot: 3x slower at (128, 28, 28) x (28, 512). Hence the explicit transposes of
    the small (T, B, F) arrays and the plain row-major matmuls, here and in the backward.)
    """
    split = like_batch(xt, 3)
    if split is not None:  # the batch split over devices (Explicit mesh): no reshape across it
        return jnp.einsum("tbf,fg->tbg", xt, W, out_sharding=split)
    return (_flat(xt) @ W).reshape(*xt.shape[:2], W.shape[1])


def _sum_outer(a: Array, b: Array, like: Array) -> Array:
    """``sum_rows a^T b`` over every leading axis, (..., m) x (..., n) -> (m, n), laid out as
    ``like`` (a parameter): one 2-D matmul on one device; on a batch split over devices the
    contraction is told its result's layout, and XLA adds the all-reduce."""
    if like_batch(a, a.ndim) is None:
        return _flat(a).T @ _flat(b)
    lead = "abcdefgh"[: a.ndim - 1]  # the summed axes
    return jnp.einsum(f"{lead}m,{lead}n->mn", a, b, out_sharding=grad_sharding(like))


def _bptt(cell_step, carry0, xs, params, cache, mode: str, split_bias: bool = False):
    """The reverse scan of BPTT plus the weight gradients; shared by the recurrent layers.

    ``cell_step(carry, xs_t) -> (carry_{t-1}, (da_t, dhp_t))`` is one layer's local backward:
    it maps the gradients at step t (``carry``: dh, and dc for the LSTM) to those at t-1 and
    returns the gradient of the input-side pre-activation ``da_t = d(x_t W + b)`` (B, k u) and
    of the recurrent-side one ``dhp_t = d(h_{t-1} U)`` (B, k u; ``None`` when equal to da_t,
    all but the GRU). Then, per ``mode``::

        dW = sum_t x_t^T da_t   dU = sum_t h_{t-1}^T dhp_t   db = sum_{t,b} da_t (, dhp_t)
        dx_t = da_t W^T

    "in_scan" accumulates dW, dU, db in the scan carry and emits dx_t per step; "after_scan"
    emits da (and dhp) as (T, B, k u) and does the sums as single 2-D matmuls over all T B
    rows after the scan. Both give the same numbers (up to summation order). Returns (dW, dU,
    db, dx), dx (B, T, F), db (2, k u) when ``split_bias`` (GRU) else (k u,), all in the
    compute dtype.
    """
    xt, hprev = cache["xt"], cache["hprev"]  # (T, B, F), (T, B, u)
    ct = hprev.dtype
    W = params["kernel"].astype(ct)  # (F, k u)
    U0 = params["recurrent_kernel"]  # (u, k u): only its layout is used here
    xt = xt.astype(ct)
    G = W.shape[1]

    if mode == "in_scan":

        def body(c, inp):
            carry, (dW, dU, db_x, db_h) = c
            xs_t, x_t, h_t = inp  # ..., (B, F), (B, u)
            carry, (da, dhp) = cell_step(carry, xs_t)
            dhp = da if dhp is None else dhp
            dW = dW + _sum_outer(x_t, da, W)  # (F, k u)
            dU = dU + _sum_outer(h_t, dhp, U0)  # (u, k u)
            db_x = db_x + jnp.sum(da, axis=0)  # (k u,)
            db_h = db_h + jnp.sum(dhp, axis=0) if split_bias else db_h
            return (carry, (dW, dU, db_x, db_h)), da @ W.T  # dx_t: (B, F)

        zeros_g = jnp.zeros((G,), ct)
        acc0 = (jnp.zeros_like(W), jnp.zeros((hprev.shape[2], G), ct), zeros_g, zeros_g)
        (_, (dW, dU, db_x, db_h)), dx = lax.scan(
            body, (carry0, acc0), (xs, xt, hprev), reverse=True, unroll=_UNROLL
        )  # dx: (T, B, F)
    else:  # "after_scan"
        _, (da, dhp) = lax.scan(cell_step, carry0, xs, reverse=True, unroll=_UNROLL)
        dhp = da if dhp is None else dhp  # (T, B, k u) each
        dW = _sum_outer(xt, da, W)  # (F, k u)
        dU = _sum_outer(hprev, dhp, U0)  # (u, k u)
        db_x, db_h = jnp.sum(da, axis=(0, 1)), jnp.sum(dhp, axis=(0, 1))  # (k u,) each
        dx = _project(da, W.T)  # (T, B, F)
    db = jnp.stack([db_x, db_h]) if split_bias else db_x
    return dW, dU, db, jnp.transpose(dx, (1, 0, 2))


def _grads(params, cache, dW, dU, db, dx) -> tuple[dict, Array]:
    """(dparams in the params' dtypes, dx in the input's dtype)."""
    dparams = {"kernel": dW, "recurrent_kernel": dU, "bias": db}
    dparams = {n: g.astype(params[n].dtype) for n, g in dparams.items()}
    return dparams, dx.astype(cache["xt"].dtype)


# ----------------------------------------------------------------------------------- SimpleRNN


def SimpleRNN(
    units: int,
    activation: str = "tanh",
    *,
    return_sequences: bool = False,
    weight_grads: str = "auto",
    dtype=jnp.float32,
) -> Layer:
    """Fully connected recurrence (Keras ``SimpleRNN``): ``h_t = f(x_t W + b + h_{t-1} U)``.

    Params (Keras layout): ``kernel`` (F, u), ``recurrent_kernel`` (u, u), ``bias`` (u,).
    ``activation``: "tanh" (default), "sigmoid", "relu" or "linear". ``return_sequences``:
    False (Keras's default) returns the last state (B, u), True every step's (B, T, u).
    ``weight_grads``: where BPTT sums dW, dU, db (module docstring); "auto" is "after_scan"
    here, measured faster on CPU.

    Backward, per step from t = T-1 down to 0 (``y = h_t`` the candidate)::

        g_t      = dh_t + dy_t                      (B, u)   total gradient reaching h_t
        da_t     = g_t * f'(a_t) = g_t * (1 - h_t^2)   (tanh)      (B, u)
        dh_{t-1} = da_t U^T                         (B, u)
        masked step: da_t = 0, dh_{t-1} = g_t

    The factor ``U^T diag(f'(a_t))`` per step is what makes ``dL/dx_t`` vanish or explode
    geometrically in ``T - t`` (see :func:`grad_norm_over_time`).

    Cache, all time-major: ``xt`` (T, B, F) the input, ``hprev`` (T, B, u) = h_{t-1},
    ``hcand`` (T, B, u) = f(a_t), ``mask`` (T, B, 1) or None.
    """
    if not (isinstance(units, int) and units > 0):
        raise ValueError(f"SimpleRNN(units={units!r}): units must be a positive int.")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"SimpleRNN: activation must be one of {sorted(_ACTIVATIONS)}.")
    act, act_grad = _ACTIVATIONS[activation]
    mode = _weight_grads("SimpleRNN", weight_grads)
    name = f"SimpleRNN({units})"
    _init = _recurrent_init(name, units, 1, lambda dt: jnp.zeros((units,), dt), dtype)

    def init(key, input_shape):
        return _init(key, input_shape, return_sequences)

    def forward(params, state, x, *, key=None, train=False, mask=None):
        _recurrent_check(name, params, state, x, units, 1, (units,))
        ct = _compute_dtype(x, params["kernel"])
        W, U, b = (params[n].astype(ct) for n in ("kernel", "recurrent_kernel", "bias"))
        m = _time_mask(name, mask, x.shape)  # (T, B, 1) or None
        xt = jnp.transpose(x, (1, 0, 2))  # (T, B, F) time-major
        xp = _project(xt.astype(ct), W) + b[None, None, :]  # (T, B, u)

        def step(h, inp):  # h: (B, u)
            xp_t, m_t = inp
            hc = act(xp_t + h @ U)  # (B, u) candidate
            hn = hc if m_t is None else jnp.where(m_t, hc, h)  # masked: carry over
            return hn, (h, hc)

        h0 = jnp.zeros((x.shape[0], units), ct, out_sharding=like_batch(x, 2))  # split as x
        h_last, (hprev, hcand) = lax.scan(step, h0, (xp, m), unroll=_UNROLL)
        y = _outputs(hprev, h_last, return_sequences)
        return y, state, {"xt": xt, "hprev": hprev, "hcand": hcand, "mask": m}

    def backward(params, cache, dy):
        hprev, hcand, m = cache["hprev"], cache["hcand"], cache["mask"]
        ct = hprev.dtype
        U = params["recurrent_kernel"].astype(ct)
        dh0, dys = _dy_seed(name, dy, hprev.shape, units, return_sequences, ct)

        def step(dh, inp):  # dh: (B, u) = dL/dh_t from steps > t
            dy_t, hc_t, m_t = inp
            g = dh if dy_t is None else dh + dy_t  # (B, u)
            da = g * act_grad(hc_t)  # (B, u)
            if m_t is not None:
                da = jnp.where(m_t, da, 0)  # a masked step has no gate gradient
            dh_prev = da @ U.T  # (B, u)
            if m_t is not None:
                dh_prev = jnp.where(m_t, dh_prev, g)  # ... and passes g through
            return dh_prev, (da, None)

        grads = _bptt(step, dh0, (dys, hcand, m), params, cache, mode)
        return _grads(params, cache, *grads)

    config = ("SimpleRNN", units, activation, return_sequences, mode, jnp.dtype(dtype))
    return Layer(init, forward, backward, name, config=config)


# ---------------------------------------------------------------------------------------- LSTM


def LSTM(
    units: int,
    *,
    return_sequences: bool = False,
    weight_grads: str = "auto",
    dtype=jnp.float32,
) -> Layer:
    """Long short-term memory (Keras 3 ``LSTM``, its defaults), gates in Keras order i, f, c, o.

    Params (Keras layout): ``kernel`` (F, 4u), ``recurrent_kernel`` (u, 4u), ``bias`` (4u,),
    column blocks [i | f | c | o]; init: glorot_uniform, orthogonal, zeros with the forget block
    set to 1 (``unit_forget_bias=True``). ``return_sequences``: False (Keras's default) returns
    the last state (B, u), True every step's (B, T, u). ``weight_grads``: where BPTT sums dW,
    dU, db (module docstring); "auto" is "in_scan" here, measured faster on CPU.

    Forward, per step (``sigma`` = sigmoid, the recurrent activation)::

        a = x_t W + b + h_{t-1} U = [a_i | a_f | a_c | a_o]     (B, 4u)
        i = sigma(a_i)  f = sigma(a_f)  g = tanh(a_c)  o = sigma(a_o)   (B, u) each
        c_t = f * c_{t-1} + i * g                                (B, u)
        h_t = o * tanh(c_t)                                      (B, u)

    Backward (BPTT), carrying ``dh = dL/dh_t`` and ``dc = dL/dc_t`` from later steps::

        g_h   = dh + dy_t                       total gradient at h_t        (B, u)
        do    = g_h * tanh(c_t)                                              (B, u)
        dct   = dc + g_h * o * (1 - tanh(c_t)^2)  total gradient at c_t      (B, u)
        di    = dct * g     df = dct * c_{t-1}     dg = dct * i              (B, u)
        dc_{t-1} = dct * f                       (the forget-gate path)      (B, u)
        da    = [di i(1-i) | df f(1-f) | dg (1-g^2) | do o(1-o)]             (B, 4u)
        dh_{t-1} = da U^T                                                    (B, u)
        masked step: da = 0, dh_{t-1} = g_h, dc_{t-1} = dc

    Cache, all time-major: ``xt`` (T, B, F) the input; per step (T, B, .): ``hprev`` =
    h_{t-1} (u), ``cprev`` = c_{t-1} (u), ``gates`` = [i|f|g|o] (4u), ``tanh_c`` = tanh(c_t)
    (u; of the candidate c_t on masked steps); ``mask`` (T, B, 1) or None.
    """
    if not (isinstance(units, int) and units > 0):
        raise ValueError(f"LSTM(units={units!r}): units must be a positive int.")
    mode = _weight_grads("LSTM", weight_grads)
    name = f"LSTM({units})"
    u = units

    def bias_init(dt):  # Keras unit_forget_bias: [0 | 1 | 0 | 0]
        return jnp.concatenate([jnp.zeros((u,), dt), jnp.ones((u,), dt), jnp.zeros((2 * u,), dt)])

    _init = _recurrent_init(name, units, 4, bias_init, dtype)

    def init(key, input_shape):
        return _init(key, input_shape, return_sequences)

    def forward(params, state, x, *, key=None, train=False, mask=None):
        _recurrent_check(name, params, state, x, units, 4, (4 * u,))
        ct = _compute_dtype(x, params["kernel"])
        W, U, b = (params[n].astype(ct) for n in ("kernel", "recurrent_kernel", "bias"))
        m = _time_mask(name, mask, x.shape)
        xt = jnp.transpose(x, (1, 0, 2))  # (T, B, F) time-major
        xp = _project(xt.astype(ct), W) + b[None, None, :]  # (T, B, 4u)

        def step(carry, inp):
            h, c = carry  # (B, u), (B, u)
            xp_t, m_t = inp
            a = xp_t + h @ U  # (B, 4u)
            i = jax.nn.sigmoid(a[:, :u])
            f = jax.nn.sigmoid(a[:, u : 2 * u])
            g = jnp.tanh(a[:, 2 * u : 3 * u])
            o = jax.nn.sigmoid(a[:, 3 * u :])
            cn = f * c + i * g  # (B, u)
            tc = jnp.tanh(cn)
            hn = o * tc  # (B, u)
            if m_t is not None:
                hn, cn = jnp.where(m_t, hn, h), jnp.where(m_t, cn, c)
            gates = jnp.concatenate([i, f, g, o], axis=1)  # (B, 4u)
            return (hn, cn), (h, c, gates, tc)

        z = jnp.zeros((x.shape[0], u), ct, out_sharding=like_batch(x, 2))  # split as x
        (h_last, _), (hprev, cprev, gates, tanh_c) = lax.scan(step, (z, z), (xp, m), unroll=_UNROLL)
        y = _outputs(hprev, h_last, return_sequences)
        cache = {"xt": xt, "hprev": hprev, "cprev": cprev, "gates": gates, "tanh_c": tanh_c}
        cache["mask"] = m
        return y, state, cache

    def backward(params, cache, dy):
        hprev, m = cache["hprev"], cache["mask"]
        ct = hprev.dtype
        U = params["recurrent_kernel"].astype(ct)
        dh0, dys = _dy_seed(name, dy, hprev.shape, units, return_sequences, ct)

        def step(carry, inp):
            dh, dc = carry  # dL/dh_t, dL/dc_t from steps > t: (B, u) each
            dy_t, gates, c_prev, tc, m_t = inp
            i, f, g, o = (
                gates[:, :u],
                gates[:, u : 2 * u],
                gates[:, 2 * u : 3 * u],
                gates[:, 3 * u :],
            )
            gh = dh if dy_t is None else dh + dy_t  # (B, u)
            do = gh * tc  # (B, u)
            dct = dc + gh * o * (1 - tc * tc)  # (B, u)
            di = dct * g
            df = dct * c_prev
            dg = dct * i
            dc_prev = dct * f  # (B, u)
            da = jnp.concatenate(
                [di * i * (1 - i), df * f * (1 - f), dg * (1 - g * g), do * o * (1 - o)], axis=1
            )  # (B, 4u)
            if m_t is not None:
                da = jnp.where(m_t, da, 0)
                dc_prev = jnp.where(m_t, dc_prev, dc)
            dh_prev = da @ U.T  # (B, u)
            if m_t is not None:
                dh_prev = jnp.where(m_t, dh_prev, gh)
            return (dh_prev, dc_prev), (da, None)

        xs = (dys, cache["gates"], cache["cprev"], cache["tanh_c"], m)
        return _grads(
            params, cache, *_bptt(step, (dh0, jnp.zeros_like(dh0)), xs, params, cache, mode)
        )

    config = ("LSTM", units, return_sequences, mode, jnp.dtype(dtype))
    return Layer(init, forward, backward, name, config=config)


# ----------------------------------------------------------------------------------------- GRU


def GRU(
    units: int,
    *,
    return_sequences: bool = False,
    weight_grads: str = "auto",
    dtype=jnp.float32,
) -> Layer:
    """Gated recurrent unit, Keras 3 default variant (``reset_after=True``, CuDNN-compatible).

    Params (Keras layout): ``kernel`` (F, 3u), ``recurrent_kernel`` (u, 3u), column blocks in
    Keras order [z | r | h] (update, reset, candidate); ``bias`` (2, 3u): row 0 the input
    bias, row 1 the recurrent bias. Init: glorot_uniform, orthogonal, zeros.
    ``return_sequences``: False (Keras's default) returns the last state (B, u), True every
    step's (B, T, u). ``weight_grads``: where BPTT sums dW, dU, db (module docstring); "auto"
    is "in_scan" here, measured faster on CPU.

    Forward, per step::

        xp = x_t W + b[0] = [xz | xr | xh]           (B, 3u)
        hp = h_{t-1} U + b[1] = [hz | hr | hh]        (B, 3u)
        z = sigma(xz + hz)    r = sigma(xr + hr)     (B, u)
        n = tanh(xh + r * hh)                        (B, u)   (reset applied after U)
        h_t = z * h_{t-1} + (1 - z) * n              (B, u)   (Keras's convention)

    Backward (BPTT), carrying ``dh = dL/dh_t``::

        g   = dh + dy_t                                          (B, u)
        dz  = g * (h_{t-1} - n)      dn = g * (1 - z)            (B, u)
        dan = dn * (1 - n^2)         dr = dan * hh               (B, u)
        daz = dz * z (1 - z)         dar = dr * r (1 - r)        (B, u)
        dxp = [daz | dar | dan]          -> kernel, bias[0], dx  (B, 3u)
        dhp = [daz | dar | dan * r]      -> recurrent_kernel, bias[1]   (B, 3u)
        dh_{t-1} = g * z + dhp U^T                               (B, u)
        masked step: dxp = dhp = 0, dh_{t-1} = g

    Cache, all time-major: ``xt`` (T, B, F) the input; per step (T, B, .): ``hprev`` (u),
    ``gates`` = [z|r|n] (3u), ``hh`` = h_{t-1} U_h + b[1]_h (u); ``mask`` (T, B, 1) or None.
    """
    if not (isinstance(units, int) and units > 0):
        raise ValueError(f"GRU(units={units!r}): units must be a positive int.")
    mode = _weight_grads("GRU", weight_grads)
    name = f"GRU({units})"
    u = units
    _init = _recurrent_init(name, units, 3, lambda dt: jnp.zeros((2, 3 * u), dt), dtype)

    def init(key, input_shape):
        return _init(key, input_shape, return_sequences)

    def forward(params, state, x, *, key=None, train=False, mask=None):
        _recurrent_check(name, params, state, x, units, 3, (2, 3 * u))
        ct = _compute_dtype(x, params["kernel"])
        W, U, b = (params[n].astype(ct) for n in ("kernel", "recurrent_kernel", "bias"))
        m = _time_mask(name, mask, x.shape)
        xt = jnp.transpose(x, (1, 0, 2))  # (T, B, F) time-major
        xp = _project(xt.astype(ct), W) + b[0][None, None, :]  # (T, B, 3u)
        b_rec = b[1][None, :]  # (1, 3u)

        def step(h, inp):  # h: (B, u)
            xp_t, m_t = inp
            hp = h @ U + b_rec  # (B, 3u)
            z = jax.nn.sigmoid(xp_t[:, :u] + hp[:, :u])
            r = jax.nn.sigmoid(xp_t[:, u : 2 * u] + hp[:, u : 2 * u])
            hh = hp[:, 2 * u :]
            n = jnp.tanh(xp_t[:, 2 * u :] + r * hh)
            hn = z * h + (1 - z) * n  # (B, u)
            if m_t is not None:
                hn = jnp.where(m_t, hn, h)
            return hn, (h, jnp.concatenate([z, r, n], axis=1), hh)

        h0 = jnp.zeros((x.shape[0], u), ct, out_sharding=like_batch(x, 2))  # split as x
        h_last, (hprev, gates, hh) = lax.scan(step, h0, (xp, m), unroll=_UNROLL)
        y = _outputs(hprev, h_last, return_sequences)
        return y, state, {"xt": xt, "hprev": hprev, "gates": gates, "hh": hh, "mask": m}

    def backward(params, cache, dy):
        hprev, m = cache["hprev"], cache["mask"]
        ct = hprev.dtype
        U = params["recurrent_kernel"].astype(ct)
        dh0, dys = _dy_seed(name, dy, hprev.shape, units, return_sequences, ct)

        def step(dh, inp):  # dh: (B, u)
            dy_t, gates, hh, h_prev, m_t = inp
            z, r, n = gates[:, :u], gates[:, u : 2 * u], gates[:, 2 * u :]
            g = dh if dy_t is None else dh + dy_t  # (B, u)
            dz = g * (h_prev - n)
            dn = g * (1 - z)
            dan = dn * (1 - n * n)  # (B, u)  d/d(xh + r*hh)
            dr = dan * hh
            daz = dz * z * (1 - z)
            dar = dr * r * (1 - r)
            dxp = jnp.concatenate([daz, dar, dan], axis=1)  # (B, 3u)
            dhp = jnp.concatenate([daz, dar, dan * r], axis=1)  # (B, 3u)
            if m_t is not None:
                dxp, dhp = jnp.where(m_t, dxp, 0), jnp.where(m_t, dhp, 0)
            dh_prev = g * z + dhp @ U.T  # (B, u)
            if m_t is not None:
                dh_prev = jnp.where(m_t, dh_prev, g)
            return dh_prev, (dxp, dhp)

        xs = (dys, cache["gates"], cache["hh"], hprev, m)
        dW, dU, db, dx = _bptt(step, dh0, xs, params, cache, mode, split_bias=True)  # (2, 3u) db
        return _grads(params, cache, dW, dU, db, dx)

    config = ("GRU", units, return_sequences, mode, jnp.dtype(dtype))
    return Layer(init, forward, backward, name, config=config)


# ------------------------------------------------------------------------------ diagnostics


def grad_norm_over_time(
    layer: Layer, params: PyTree, x: Array, *, mask: Array | None = None, dy: Array | None = None
) -> Array:
    """``||dL/dx_t||`` (over batch and features) for each step t, by the hand-written backward.

    ``L = sum(y * dy)`` with ``dy`` = ones like the output by default; for a layer with
    ``return_sequences=False`` that is a loss on the last output only, so the result shows how
    the gradient reaching step ``t`` decays (vanishes) or grows (explodes) with ``T - t``.
    Returns shape (T,).
    """
    y, _, cache = layer.forward(params, (), x, mask=mask)
    dy = jnp.ones_like(y) if dy is None else dy
    _, dx = layer.backward(params, cache, dy)  # (B, T, F)
    return jnp.sqrt(jnp.sum(dx * dx, axis=(0, 2)))


# -------------------------------------------------------------------------- PyTorch weights


def lstm_from_torch(weight_ih, weight_hh, bias_ih, bias_hh) -> dict:
    """Params of :func:`LSTM` from a ``torch.nn.LSTM`` layer's ``*_l0`` weights (as arrays).

    PyTorch: ``weight_ih`` (4u, F), ``weight_hh`` (4u, u), biases (4u,), row blocks
    [i | f | g | o] -- the same gate order as Keras's [i | f | c | o], and the same equations
    (``c' = f c + i g``, ``h' = o tanh(c')``). So: ``kernel = weight_ih^T``,
    ``recurrent_kernel = weight_hh^T``, ``bias = bias_ih + bias_hh`` (Keras has one bias).
    """
    return {
        "kernel": jnp.asarray(weight_ih).T,
        "recurrent_kernel": jnp.asarray(weight_hh).T,
        "bias": jnp.asarray(bias_ih) + jnp.asarray(bias_hh),
    }


def lstm_to_torch(params: dict) -> tuple[Array, Array, Array, Array]:
    """``(weight_ih, weight_hh, bias_ih, bias_hh)`` for ``torch.nn.LSTM`` from LSTM params.

    The single Keras bias goes into ``bias_ih``; ``bias_hh`` is zeros (only the sum matters).
    """
    b = jnp.asarray(params["bias"])
    return params["kernel"].T, params["recurrent_kernel"].T, b, jnp.zeros_like(b)


def _swap_first_two(w: Array, u: int, axis: int) -> Array:
    """Blocks [A | B | C] of size u along ``axis`` -> [B | A | C] (torch r,z,n <-> Keras z,r,h)."""
    a, b_, c = jnp.split(w, [u, 2 * u], axis=axis)
    return jnp.concatenate([b_, a, c], axis=axis)


def gru_from_torch(weight_ih, weight_hh, bias_ih, bias_hh) -> dict:
    """Params of :func:`GRU` from a ``torch.nn.GRU`` layer's ``*_l0`` weights (as arrays).

    PyTorch: row blocks [r | z | n], ``n = tanh(W_in x + b_in + r * (W_hn h + b_hn))``,
    ``h' = (1 - z) n + z h`` -- exactly Keras's ``reset_after=True`` GRU with blocks reordered
    to [z | r | h]: ``kernel = P(weight_ih)^T``, ``recurrent_kernel = P(weight_hh)^T``,
    ``bias = [P(bias_ih); P(bias_hh)]`` (2, 3u), where P swaps the first two blocks of u.
    The mapping is exact and invertible (:func:`gru_to_torch`).
    """
    u = jnp.asarray(weight_hh).shape[1]
    return {
        "kernel": _swap_first_two(jnp.asarray(weight_ih), u, 0).T,
        "recurrent_kernel": _swap_first_two(jnp.asarray(weight_hh), u, 0).T,
        "bias": jnp.stack(
            [
                _swap_first_two(jnp.asarray(bias_ih), u, 0),
                _swap_first_two(jnp.asarray(bias_hh), u, 0),
            ]
        ),
    }


def gru_to_torch(params: dict) -> tuple[Array, Array, Array, Array]:
    """``(weight_ih, weight_hh, bias_ih, bias_hh)`` for ``torch.nn.GRU`` from GRU params."""
    u = params["recurrent_kernel"].shape[0]
    b = params["bias"]
    return (
        _swap_first_two(params["kernel"].T, u, 0),
        _swap_first_two(params["recurrent_kernel"].T, u, 0),
        _swap_first_two(b[0], u, 0),
        _swap_first_two(b[1], u, 0),
    )


# ------------------------------------------------------------------------------ embeddings


def check_ids(ids, vocab_size: int) -> None:
    """Host-side check that every token id is in ``[0, vocab_size)``; call it on concrete ids.

    Raises ValueError naming the first bad position (row-major) and its value. Inside ``jit``
    the ids are not known, so :func:`Embedding` cannot raise: see its docstring for what an
    out-of-range id does there.
    """
    a = np.asarray(ids)
    if not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"check_ids: token ids should be integers, got dtype {a.dtype}.")
    bad = (a < 0) | (a >= vocab_size)
    if bad.any():
        pos = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"token id {int(a[pos])} at position {pos} is out of range for an Embedding with "
            f"vocab_size={vocab_size} (valid ids: 0..{vocab_size - 1})."
        )


def padding_mask(ids: Array, pad_id: int = 0) -> Array:
    """The ``(batch, time)`` mask of Keras's ``Embedding(mask_zero=True)``: ``ids != pad_id``."""
    return jnp.asarray(ids) != pad_id


_KERAS_UNIFORM = initializers.uniform(-0.05, 0.05)  # Keras's "uniform" (RandomUniform defaults)


def Embedding(
    vocab_size: int,
    dim: int,
    *,
    w_init: initializers.Initializer = _KERAS_UNIFORM,
    dtype=jnp.float32,
) -> Layer:
    """Token embedding (Keras ``Embedding``): ``y[..., :] = E[ids[...], :]``.

    Params: ``embeddings`` (vocab_size, dim), Keras's name and layout; default init
    ``U(-0.05, 0.05)`` as Keras's ``"uniform"``. Input: integer ids of shape (batch, ...),
    usually (batch, time); output (batch, ..., dim). ``mask`` is ignored (see
    :func:`padding_mask` for Keras's ``mask_zero``).

    Backward: ``dE = zeros.at[ids].add(dy)`` -- a scatter-add, so an id used n times gets the
    sum of its n output gradients; rows not used get 0. Ids have no gradient: ``dx = None``.

    Out-of-range ids (``< 0`` or ``>= vocab_size``): JAX cannot raise inside ``jit``. Here a
    bad id reads a row of NaN, easy to spot (a NaN loss), and the backward drops its gradient.
    (Plain ``E[ids]`` would silently clamp it to the last row, and wrap a negative id
    Python-style.) Validate concrete ids on the host with :func:`check_ids`.

    Cache: ``ids`` (batch, ...).
    """
    if not (isinstance(vocab_size, int) and vocab_size > 0 and isinstance(dim, int) and dim > 0):
        raise ValueError(f"Embedding({vocab_size!r}, {dim!r}): sizes must be positive ints.")
    name = f"Embedding({vocab_size}, {dim})"

    def init(key, input_shape):
        params = {"embeddings": w_init(key, (vocab_size, dim), dtype)}
        return (*tuple(input_shape), dim), params, ()

    def forward(params, state, x, *, key=None, train=False, mask=None):
        check_tree(name, "params", params, {"embeddings": (vocab_size, dim)})
        _check_state(name, state)
        x = jnp.asarray(x)
        if not jnp.issubdtype(x.dtype, jnp.integer):
            raise TypeError(
                f"{name}: the input should be integer token ids, got dtype {x.dtype}. Cast "
                f"them with ids.astype(jnp.int32) (floats are not rounded silently)."
            )
        if x.ndim < 1:
            raise ShapeError(
                f"the input should be ids of shape (batch, ...), got {x.shape}.", layer=name
            )
        E = params["embeddings"]
        valid = (x >= 0) & (x < vocab_size)  # (*ids.shape,)
        ids = jnp.where(valid, x, 0)  # (*ids.shape,), every index in range
        rows = E.at[ids].get(out_sharding=like_batch(x, x.ndim + 1))  # (*ids.shape, dim)
        y = jnp.where(valid[..., None], rows, jnp.nan)  # a bad id reads a row of NaN
        return y, state, x

    def backward(params, ids, dy):
        E = params["embeddings"]
        check_dy(name, (*ids.shape, dim), dy)
        dy = dy.astype(E.dtype)  # (*ids.shape, dim)
        # scatter-add: an id used n times gets the sum of its n rows of dy; a bad id is sent to
        # row vocab_size, which does not exist, and mode="drop" drops it
        rows = jnp.where((ids >= 0) & (ids < vocab_size), ids, vocab_size)  # (*ids.shape,)
        dE = jnp.zeros_like(E).at[rows].add(dy, mode="drop", out_sharding=grad_sharding(E))
        return {"embeddings": dE}, None

    config = ("Embedding", vocab_size, dim, w_init, jnp.dtype(dtype))
    return Layer(init, forward, backward, name, config=config)


def PositionalEmbedding(
    max_len: int,
    *,
    w_init: initializers.Initializer = initializers.glorot_uniform,
    dtype=jnp.float32,
) -> Layer:
    """Learned positions (as keras_hub's ``PositionEmbedding``): ``y[b, t] = x[b, t] + pos[t]``.

    Params: ``pos`` (max_len, d), glorot_uniform by default (keras_hub's default). Input
    (batch, time, d) with ``time <= max_len`` (else :class:`ShapeError`). ``mask`` is ignored.

    Backward::

        dx = dy                                  (B, T, d)
        dpos[:T] = sum_b dy[b]    dpos[T:] = 0   (max_len, d)

    Cache: a zero-size array ``(B, T, 0)`` in x's dtype: it carries only B, T and the dtype.
    """
    if not (isinstance(max_len, int) and max_len > 0):
        raise ValueError(f"PositionalEmbedding(max_len={max_len!r}): must be a positive int.")
    name = f"PositionalEmbedding({max_len})"

    def init(key, input_shape):
        input_shape = tuple(input_shape)
        if len(input_shape) != 2:
            raise ShapeError(f"input_shape should be (time, d), got {input_shape}.", layer=name)
        time, d = input_shape
        if time is not None and time > max_len:
            raise ShapeError(f"time {time} exceeds max_len {max_len}.", layer=name)
        return input_shape, {"pos": w_init(key, (max_len, d), dtype)}, ()

    def forward(params, state, x, *, key=None, train=False, mask=None):
        d = _cols(params, "pos")
        check_tree(name, "params", params, {"pos": (max_len, d)})
        _check_state(name, state)
        _check_input(name, x, d)
        check_shape(
            name,
            "the input",
            (None, x.shape[1], d),
            x.shape,
            f"Pass x of shape (batch, time, {d}).",
        )
        T = x.shape[1]
        if T > max_len:
            raise ShapeError(
                f"the input has {T} time steps, more than max_len={max_len}. Truncate the "
                f"sequences or build the layer with PositionalEmbedding({T}).",
                layer=name,
            )
        ct = _compute_dtype(x, params["pos"])
        y = x.astype(ct) + params["pos"][:T].astype(ct)[None]  # (B, T, d)
        return y, state, jnp.zeros((*x.shape[:2], 0), x.dtype)

    def backward(params, cache, dy):
        pos = params["pos"]
        B, T = cache.shape[:2]
        check_dy(name, (B, T, pos.shape[1]), dy)
        dpos = jnp.zeros_like(pos).at[:T].set(jnp.sum(dy, axis=0).astype(pos.dtype))  # (L, d)
        return {"pos": dpos}, dy.astype(cache.dtype)

    config = ("PositionalEmbedding", max_len, w_init, jnp.dtype(dtype))
    return Layer(init, forward, backward, name, config=config)
