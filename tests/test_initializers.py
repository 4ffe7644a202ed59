"""Initializers against jax.nn.initializers (bit for bit where the draw is the same) and against
their variance formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fbp import initializers as init

SHAPE = (300, 200)  # fan_in 300, fan_out 200
KEY = jax.random.key(0)


@pytest.mark.parametrize(
    "ours,theirs",
    [
        (init.glorot_normal, jax.nn.initializers.glorot_normal()),
        (init.he_normal, jax.nn.initializers.he_normal()),
        (init.lecun_normal, jax.nn.initializers.lecun_normal()),
        (init.normal(0.05), jax.nn.initializers.normal(0.05)),
    ],
    ids=["glorot_normal", "he_normal", "lecun_normal", "normal"],
)
def test_normal_initializers_equal_jax_nn_initializers(ours, theirs):
    np.testing.assert_allclose(
        ours(KEY, SHAPE, jnp.float32), theirs(KEY, SHAPE, jnp.float32), rtol=1e-6
    )


@pytest.mark.parametrize(
    "fn,variance,bound",
    [
        (init.glorot_uniform, 2 / 500, np.sqrt(6 / 500)),
        (init.he_uniform, 2 / 300, np.sqrt(6 / 300)),
        (init.glorot_normal, 2 / 500, 2 * np.sqrt(2 / 500) / 0.87962566103423978),
        (init.he_normal, 2 / 300, 2 * np.sqrt(2 / 300) / 0.87962566103423978),
        (init.lecun_normal, 1 / 300, 2 * np.sqrt(1 / 300) / 0.87962566103423978),
        (init.normal(0.1), 0.01, np.inf),
    ],
    ids=["glorot_uniform", "he_uniform", "glorot_normal", "he_normal", "lecun_normal", "normal"],
)
def test_variance_and_bounds_follow_the_formula(fn, variance, bound):
    w = np.asarray(fn(KEY, SHAPE, jnp.float64))
    assert w.dtype == np.float64 and w.shape == SHAPE
    # 60k draws: the sample variance is within ~1.5% (3 sigma) of the true one.
    np.testing.assert_allclose(w.var(), variance, rtol=0.03)
    assert abs(w.mean()) < 4 * np.sqrt(variance / w.size)
    assert np.abs(w).max() <= bound


def test_constants_and_dtypes():
    np.testing.assert_array_equal(init.zeros(KEY, (3, 2)), np.zeros((3, 2)))
    np.testing.assert_array_equal(init.ones(KEY, (4,)), np.ones(4))
    assert init.glorot_uniform(KEY, (3, 2)).dtype == jnp.float32
    assert init.he_normal(KEY, (3, 2), jnp.bfloat16).dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="stddev"):
        init.normal(-1.0)


@pytest.mark.parametrize("shape", [(4, 4), (6, 3), (3, 6), (2, 3, 5)])
def test_orthogonal_is_the_sign_corrected_q_of_numpys_qr(shape):
    """The same normal draw through NumPy's QR: Q with its columns' signs set by diag(R)
    (rows < cols: the transpose), times the gain; orthonormal columns or rows."""
    w = np.asarray(init.orthogonal(gain=2.0)(KEY, shape, jnp.float64))
    assert w.shape == shape and w.dtype == np.float64
    rows, cols = int(np.prod(shape[:-1])), shape[-1]
    a = np.asarray(jax.random.normal(KEY, (max(rows, cols), min(rows, cols)), jnp.float64))
    q, r = np.linalg.qr(a)
    q = q * np.sign(np.diag(r))
    want = 2.0 * (q if rows >= cols else q.T)
    np.testing.assert_allclose(w.reshape(rows, cols), want, rtol=1e-12, atol=1e-14)
    m = w.reshape(rows, cols) / 2.0
    gram = m.T @ m if rows >= cols else m @ m.T
    np.testing.assert_allclose(gram, np.eye(min(rows, cols)), atol=1e-13)


def test_orthogonal_refuses_vectors_and_uniform_has_its_bounds():
    with pytest.raises(ValueError, match="rank >= 2"):
        init.orthogonal()(KEY, (3,), jnp.float64)
    assert init.orthogonal()(KEY, (3, 3)).dtype == jnp.float32
    w = np.asarray(init.uniform()(KEY, SHAPE, jnp.float64))  # Keras's RandomUniform(-0.05, 0.05)
    assert -0.05 <= w.min() < -0.049 and 0.049 < w.max() < 0.05
    np.testing.assert_allclose(w.var(), 0.1**2 / 12, rtol=0.03)
    assert init.uniform(0.0, 2.0)(KEY, (4,)).dtype == jnp.float32
    with pytest.raises(ValueError, match="minval"):
        init.uniform(1.0, 1.0)


ALL = {
    "glorot_uniform": init.glorot_uniform,
    "glorot_normal": init.glorot_normal,
    "he_uniform": init.he_uniform,
    "he_normal": init.he_normal,
    "lecun_normal": init.lecun_normal,
    "normal": init.normal(0.05),
    "uniform": init.uniform(-0.1, 0.3),
    "orthogonal": init.orthogonal(1.5),
    "zeros": init.zeros,
    "ones": init.ones,
}


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("shape", [(7, 5), (3, 3, 2, 4)])
def test_the_quickly_compiled_draw_has_the_bits_of_a_plain_jit(name, dtype, shape):
    """Called eagerly, an initializer is a program of its own compiled with XLA options that
    compile faster; inside jit (nested, so without them) it must give the very same bits."""
    fn = ALL[name]
    eager = fn(KEY, shape, dtype)
    traced = jax.jit(lambda k: fn(k, shape, dtype))(KEY)
    assert eager.dtype == traced.dtype == dtype and eager.shape == shape
    np.testing.assert_array_equal(eager, traced)


def test_the_uniform_draw_is_jax_random_uniform_of_the_whole_shape():
    """The flat draw, reshaped, is the draw of the whole shape (threefry bits by position)."""
    limit = np.sqrt(6 / 500)
    want = jax.random.uniform(KEY, SHAPE, jnp.float32, -limit, limit)
    np.testing.assert_array_equal(init.glorot_uniform(KEY, SHAPE), want)


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_split_gives_jax_random_splits_keys(n):
    want = jax.random.key_data(jax.random.split(KEY, n))
    got = init.split(KEY, n)
    assert isinstance(got, tuple) and len(got) == n
    np.testing.assert_array_equal(np.stack([jax.random.key_data(k) for k in got]), want)
    inside = jax.jit(lambda k: jnp.stack([jax.random.key_data(k) for k in init.split(k, n)]))
    np.testing.assert_array_equal(inside(KEY), want)
