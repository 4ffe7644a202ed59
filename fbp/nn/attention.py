"""Multi-head self-attention with a hand-written backward pass.

Shapes: ``B`` batch, ``T`` time, ``D`` d_model, ``H`` heads, ``e`` head_dim, ``I = H e``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from fbp import initializers
from fbp.core import Array, Layer, ShapeError, check_shape, check_tree
from fbp.nn._base import check_dy, grad_sharding, sequence_mask


def _rows(params, key: str) -> int:
    try:
        return int(params[key].shape[0])
    except (TypeError, KeyError, IndexError, AttributeError):
        return 1


def _allowed(mask: Array | None, causal: bool, T: int) -> Array | None:
    """Which (query, key) pairs may attend: (B, 1, T, T), (1, 1, T, T) or None (all)."""
    allowed = None
    if mask is not None:
        allowed = mask[:, None, None, :]  # (B, 1, 1, T): keys that are real steps
    if causal:
        tri = jnp.tril(jnp.ones((T, T), jnp.bool_))[None, None]  # (1, 1, T, T): k <= q
        allowed = tri if allowed is None else allowed & tri  # (B, 1, T, T)
    return allowed


def masked_softmax(s: Array, allowed: Array | None) -> Array:
    """Softmax over the last axis restricted to ``allowed``; a row with nothing allowed is 0.

    Stable: subtracts the row max over the allowed entries (``stop_gradient``: the softmax
    does not depend on the shift, so it needs no derivative). Masked entries enter as
    ``-inf`` and give ``exp(-inf) = 0`` exactly, with zero derivative (no NaN under autodiff,
    even for fully masked rows, whose max is replaced by 0 and whose sum by 1).
    """
    if allowed is None:
        mx = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
        e = jnp.exp(s - mx)
        return e / jnp.sum(e, axis=-1, keepdims=True)
    s = jnp.where(allowed, s, -jnp.inf)
    mx = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    mx = jnp.where(jnp.isfinite(mx), mx, 0)  # fully masked row: all -inf
    e = jnp.exp(s - mx)  # 0 where masked
    den = jnp.sum(e, axis=-1, keepdims=True)
    return e / jnp.where(den > 0, den, 1)


def MultiHeadSelfAttention(
    num_heads: int,
    head_dim: int | None = None,
    causal: bool = False,
    dropout: float = 0.0,
    *,
    dtype=jnp.float32,
) -> Layer:
    """Multi-head scaled dot-product self-attention on (B, T, D), D = d_model.

    Params: ``wq``, ``wk``, ``wv`` (D, I) and ``bq``, ``bk``, ``bv`` (I,); ``wo`` (I, D), ``bo``
    (D,); ``I = num_heads * head_dim``, ``head_dim`` defaults to ``D // num_heads``. Init:
    glorot_uniform on these 2-D matrices, zero biases. (Keras's ``MultiHeadAttention`` keeps
    kernels as (D, H, e) / (H, e, D); reshape to load them -- its glorot fans differ.)

    Forward (per batch b and head h; ``s = 1/sqrt(e)``)::

        q = x Wq + bq,  k = x Wk + bk,  v = x Wv + bv     (B, T, H, e) after the reshape
        S = s q k^T                                        (B, H, T, T)
        P = masked_softmax(S)  over keys, masked where not allowed     (B, H, T, T)
        Pd = P * keep / (1 - rate)       (train=True, dropout > 0: inverted dropout on P)
        C = Pd v                                           (B, T, H, e) -> (B, T, I)
        y = C Wo + bo                                      (B, T, D)

    ``mask`` (B, T), False on padding, masks the *keys* (padded steps are never attended to);
    a ``(B,)`` mask (``fit``'s padded last batch) marks whole sequences and is broadcast over
    time. ``causal`` also masks keys after the query. The outputs at padded *query* positions are
    computed like any other (attending to the real steps); leave them out in the loss. A
    query row with no allowed key (a fully padded sequence; causal with left padding) has
    P = 0, so its C = 0 and y = bo, finite in forward and backward.

    Backward::

        dWo = C^T dy   dbo = sum dy   dC = dy Wo^T             (I, D), (D,), (B, T, H, e)
        dPd = dC v^T   dv = Pd^T dC                            (B, H, T, T), (B, T, H, e)
        dP  = dPd * keep / (1 - rate)                          (B, H, T, T)
        dS  = P * (dP - rowsum(dP * P))                        (B, H, T, T)  softmax backward
        dq  = s dS k   dk = s dS^T q                           (B, T, H, e)
        dW* = x^T dq*  db* = sum dq*   dx = sum_* dq* W*^T     for * in q, k, v

    Masked entries have P = 0, hence dS = 0: the mask needs no separate backward.
    With ``train=True`` and ``dropout > 0`` a PRNG ``key`` is required; ``train=False`` never
    drops; ``dropout`` is the drop probability of each attention weight, as Keras's and
    PyTorch's. Cache: ``x`` (B, T, D), ``qkv`` (B, T, 3I), ``P`` (B, H, T, T), ``keep`` (B, H, T,
    T) bool or None, ``C`` (B, T, I).
    """
    if not (isinstance(num_heads, int) and num_heads > 0):
        raise ValueError(f"MultiHeadSelfAttention(num_heads={num_heads!r}): a positive int.")
    if head_dim is not None and not (isinstance(head_dim, int) and head_dim > 0):
        raise ValueError(f"MultiHeadSelfAttention(head_dim={head_dim!r}): a positive int.")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"MultiHeadSelfAttention(dropout={dropout}): must be in [0, 1).")
    H = num_heads
    name = f"MultiHeadSelfAttention({num_heads}{', causal' if causal else ''})"

    def _head_dim(D: int) -> int:
        return head_dim if head_dim is not None else max(D // H, 1)

    def init(key, input_shape):
        input_shape = tuple(input_shape)
        if len(input_shape) != 2:
            raise ShapeError(
                f"input_shape should be (time, d_model), got {input_shape}.", layer=name
            )
        D = input_shape[1]
        if head_dim is None and D % H:
            raise ShapeError(
                f"d_model={D} is not divisible by num_heads={H}: pass head_dim explicitly.",
                layer=name,
            )
        I = H * _head_dim(D)
        ks = initializers.split(key, 4)
        params = {
            "wq": initializers.glorot_uniform(ks[0], (D, I), dtype),
            "wk": initializers.glorot_uniform(ks[1], (D, I), dtype),
            "wv": initializers.glorot_uniform(ks[2], (D, I), dtype),
            "wo": initializers.glorot_uniform(ks[3], (I, D), dtype),
            "bq": jnp.zeros((I,), dtype),
            "bk": jnp.zeros((I,), dtype),
            "bv": jnp.zeros((I,), dtype),
            "bo": jnp.zeros((D,), dtype),
        }
        return input_shape, params, ()

    def _check(params, state, x):
        D = _rows(params, "wq")
        I = H * _head_dim(D)
        want = {"wq": (D, I), "wk": (D, I), "wv": (D, I), "wo": (I, D)}
        want |= {"bq": (I,), "bk": (I,), "bv": (I,), "bo": (D,)}
        check_tree(name, "params", params, want)
        check_tree(name, "state", state, (), "This layer has no state: pass ().")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{name}: the input should be floating point, got {x.dtype}.")
        if x.ndim != 3:
            raise ShapeError(
                f"the input should have shape (batch, time, {D}), got {tuple(x.shape)}.",
                layer=name,
            )
        check_shape(
            name,
            "the input",
            (None, x.shape[1], D),
            x.shape,
            f"Pass x of shape (batch, time, {D}) (d_model={D}).",
        )
        return D, I

    def forward(params, state, x, *, key=None, train=False, mask=None):
        _, I = _check(params, state, x)
        B, T = x.shape[:2]
        e = I // H
        ct = np.promote_types(x.dtype, params["wq"].dtype)
        scale = 1.0 / math.sqrt(e)
        p = {n: a.astype(ct) for n, a in params.items()}
        xc = x.astype(ct)
        w_qkv = jnp.concatenate([p["wq"], p["wk"], p["wv"]], axis=1)  # (D, 3I)
        b_qkv = jnp.concatenate([p["bq"], p["bk"], p["bv"]])  # (3I,)
        qkv = jnp.einsum("btd,di->bti", xc, w_qkv) + b_qkv[None, None, :]  # (B, T, 3I)
        q, k, v = (a.reshape(B, T, H, e) for a in jnp.split(qkv, 3, axis=-1))
        S = jnp.einsum("bqhe,bkhe->bhqk", q, k) * scale  # (B, H, T, T)
        mask = sequence_mask(name, mask, B, T)  # (B, T): the real steps, or None
        P = masked_softmax(S, _allowed(mask, causal, T))  # (B, H, T, T)
        keep = None
        if train and dropout > 0:
            if key is None:
                raise ValueError(
                    f"{name}: train=True with dropout={dropout} needs a PRNG key: pass "
                    f"key=jax.random.key(...) (or train=False for evaluation)."
                )
            keep = jax.random.bernoulli(key, 1.0 - dropout, P.shape)  # (B, H, T, T)
            Pd = jnp.where(keep, P * (1.0 / (1.0 - dropout)), 0)
        else:
            Pd = P
        C = jnp.einsum("bhqk,bkhe->bqhe", Pd, v).reshape(B, T, I)  # (B, T, I)
        y = jnp.einsum("bti,id->btd", C, p["wo"]) + p["bo"][None, None, :]  # (B, T, D)
        return y, state, {"x": x, "qkv": qkv, "P": P, "keep": keep, "C": C}

    def backward(params, cache, dy):
        x, qkv, P, keep, C = cache["x"], cache["qkv"], cache["P"], cache["keep"], cache["C"]
        B, T, D = x.shape
        I = C.shape[-1]
        e = I // H
        ct = qkv.dtype
        scale = 1.0 / math.sqrt(e)
        check_dy(name, (B, T, D), dy)
        dy = dy.astype(ct)
        p = {n: a.astype(ct) for n, a in params.items()}
        q, k, v = (a.reshape(B, T, H, e) for a in jnp.split(qkv, 3, axis=-1))
        Pd = P if keep is None else jnp.where(keep, P * (1.0 / (1.0 - dropout)), 0)
        # output projection
        dwo = jnp.einsum("bti,btd->id", C, dy, out_sharding=grad_sharding(p["wo"]))  # (I, D)
        dbo = jnp.sum(dy, axis=(0, 1))  # (D,)
        dC = jnp.einsum("btd,id->bti", dy, p["wo"]).reshape(B, T, H, e)  # (B, T, H, e)
        # weighted sum C = Pd v
        dPd = jnp.einsum("bqhe,bkhe->bhqk", dC, v)  # (B, H, T, T)
        dv = jnp.einsum("bhqk,bqhe->bkhe", Pd, dC)  # (B, T, H, e)
        dP = dPd if keep is None else jnp.where(keep, dPd * (1.0 / (1.0 - dropout)), 0)
        # softmax: dS = P * (dP - rowsum(dP * P)); zero wherever P is (masked keys, dead rows)
        dS = P * (dP - jnp.sum(dP * P, axis=-1, keepdims=True))  # (B, H, T, T)
        dS = dS * scale
        dq = jnp.einsum("bhqk,bkhe->bqhe", dS, k)  # (B, T, H, e)
        dk = jnp.einsum("bhqk,bqhe->bkhe", dS, q)  # (B, T, H, e)
        # the three input projections, fused: qkv = x [Wq|Wk|Wv] + [bq|bk|bv]
        dqkv = jnp.concatenate([a.reshape(B, T, I) for a in (dq, dk, dv)], axis=-1)  # (B,T,3I)
        w_qkv = jnp.concatenate([p["wq"], p["wk"], p["wv"]], axis=1)  # (D, 3I)
        dw_qkv = jnp.einsum(
            "btd,bti->di", x.astype(ct), dqkv, out_sharding=grad_sharding(w_qkv)
        )  # (D, 3I)
        db_qkv = jnp.sum(dqkv, axis=(0, 1))  # (3I,)
        dx = jnp.einsum("bti,di->btd", dqkv, w_qkv)  # (B, T, D)
        dwq, dwk, dwv = jnp.split(dw_qkv, 3, axis=1)
        dbq, dbk, dbv = jnp.split(db_qkv, 3)
        grads = {"wq": dwq, "wk": dwk, "wv": dwv, "wo": dwo}
        grads |= {"bq": dbq, "bk": dbk, "bv": dbv, "bo": dbo}
        return {n: g.astype(params[n].dtype) for n, g in grads.items()}, dx.astype(x.dtype)

    config = ("MultiHeadSelfAttention", num_heads, head_dim, causal, dropout, jnp.dtype(dtype))
    return Layer(init, forward, backward, name, config=config)
