"""The Hessian estimators against exact computations, with tolerances from the sample count."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sophia_jax

N, D, V = 12, 3, 5
SAMPLES = 16000


def _softmax_regression(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, D)).astype(np.float32)
    params = {"w": rng.standard_normal((D, V)).astype(np.float32), "b": rng.standard_normal(V).astype(np.float32)}
    mask = (rng.random(N) < 0.7).astype(np.float32)
    return x, params, mask


def _exact_gauss_newton_diag(x, params, mask):
    """Closed form: the GN matrix of mean CE wrt logits is diag(p) - p p^T per row, so
    diag over W[j, c] is mean_i x_ij^2 p_ic (1 - p_ic), and over b[c] mean_i p_ic (1 - p_ic)."""
    logits = x.astype(np.float64) @ params["w"] + params["b"]
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    curvature = p * (1 - p) * mask[:, None]
    n = mask.sum()
    return {"w": (x.astype(np.float64) ** 2).T @ curvature / n, "b": curvature.sum(0) / n}


def _sample_mean_and_sem(hessian_fn, params, **extra):
    keys = jax.random.split(jax.random.PRNGKey(1), SAMPLES)
    draws = jax.jit(jax.vmap(lambda k: hessian_fn(params, k, **extra)))(keys)
    mean = jax.tree.map(lambda d: np.asarray(d, np.float64).mean(0), draws)
    sem = jax.tree.map(lambda d: np.asarray(d, np.float64).std(0) / np.sqrt(SAMPLES), draws)
    return mean, sem


def _assert_unbiased(mean, sem, exact):
    for name in exact:
        # 5 standard errors per coordinate (about 1 in 3.5 million to fail by chance).
        np.testing.assert_array_less(np.abs(mean[name] - exact[name]), 5 * sem[name] + 1e-7)


@pytest.mark.parametrize("masked", [False, True])
def test_gnb_is_unbiased_for_the_gauss_newton_diagonal(masked):
    x, params, mask = _softmax_regression()
    if not masked:
        mask = np.ones_like(mask)

    def logits_fn(params, x, mask):
        logits = x @ params["w"] + params["b"]
        return (logits, mask) if masked else logits

    mean, sem = _sample_mean_and_sem(sophia_jax.gauss_newton_bartlett(logits_fn), params, x=x, mask=mask)
    exact = _exact_gauss_newton_diag(x, params, mask)
    _assert_unbiased(mean, sem, exact)
    # The test has power: a 15% scale error would be more than 5 standard errors away.
    assert np.all(0.15 * exact["w"] > 5 * sem["w"])


def test_gnb_clips_the_sampled_gradient_to_max_grad_norm():
    x, params, _ = _softmax_regression()

    def logits_fn(params, x):
        return x @ params["w"] + params["b"]

    key = jax.random.PRNGKey(3)
    free = sophia_jax.gauss_newton_bartlett(logits_fn)(params, key, x=x)
    clipped = sophia_jax.gauss_newton_bartlett(logits_fn, max_grad_norm=1e-3)(params, key, x=x)
    # h_hat = N g**2, so sum(h_hat) / N is the squared global norm of the sampled gradient.
    free_norm = np.sqrt(sum(float(v.sum()) for v in free.values()) / N)
    clipped_norm = np.sqrt(sum(float(v.sum()) for v in clipped.values()) / N)
    assert free_norm > 1e-2
    assert clipped_norm == pytest.approx(1e-3, rel=1e-4)
    # Same sampled labels, same direction: every coordinate is scaled by the same factor.
    scale = (1e-3 / free_norm) ** 2
    for name in free:
        np.testing.assert_allclose(clipped[name], scale * free[name], rtol=1e-4, atol=1e-12)


def test_gnb_microbatches_restate_the_whole_batch_estimate():
    # Independent restatement: sample microbatch i's labels (rows i, i+M, ...) with fold_in(key, i), then
    # take N * g**2 of the masked mean cross-entropy over the whole batch in float64 NumPy.
    x, params, mask = _softmax_regression(seed=4)
    M, key = 3, jax.random.PRNGKey(7)

    def logits_fn(params, x, mask):
        return x @ params["w"] + params["b"], mask

    got = sophia_jax.gauss_newton_bartlett(logits_fn, microbatches=M)(params, key, x=jnp.asarray(x), mask=mask)
    logits = x.astype(np.float64) @ params["w"] + params["b"]
    labels = np.zeros(N, np.int64)
    for i in range(M):
        rows = np.arange(i, N, M)
        labels[rows] = np.asarray(jax.random.categorical(jax.random.fold_in(key, i), logits[rows].astype(np.float32)))
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    n = mask.sum()
    dlogits = (p - np.eye(V)[labels]) * mask[:, None] / n  # d(mean CE)/d(logits)
    g = {"w": x.astype(np.float64).T @ dlogits, "b": dlogits.sum(0)}
    for name in g:
        np.testing.assert_allclose(got[name], n * g[name] ** 2, rtol=2e-4, atol=1e-9)
    # It is an estimate of the same curvature: unbiased, like the whole-batch one.
    mean, sem = _sample_mean_and_sem(sophia_jax.gauss_newton_bartlett(logits_fn, microbatches=M), params,
                                     x=x, mask=mask)
    _assert_unbiased(mean, sem, _exact_gauss_newton_diag(x, params, mask))
    with pytest.raises(ValueError, match="not divisible by 5"):
        sophia_jax.gauss_newton_bartlett(logits_fn, microbatches=5)(params, key, x=x, mask=mask)


def test_gnb_rejects_a_mask_of_the_wrong_shape():
    hessian_fn = sophia_jax.gauss_newton_bartlett(lambda p: (jnp.zeros((4, 3)), jnp.ones(3)))
    with pytest.raises(ValueError, match="leading shape"):
        hessian_fn({"w": jnp.zeros(2)}, jax.random.PRNGKey(0))


def _nonconvex(params):
    x, y = params["x"], params["y"]
    return jnp.sum(jnp.sin(x) * x**2) + jnp.sum(jnp.cos(3 * y)) * jnp.sum(x) + (x[0] * y[1]) ** 2


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased_for_the_hessian_diagonal(distribution):
    params = {"x": jnp.array([0.3, -1.2, 2.0]), "y": jnp.array([0.5, 1.5])}
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    exact = unravel(jnp.diag(jax.hessian(lambda f: _nonconvex(unravel(f)))(flat)))
    exact = jax.tree.map(lambda a: np.asarray(a, np.float64), exact)
    assert any(np.any(v < 0) for v in exact.values()), "pick a point with negative curvature"

    hessian_fn = sophia_jax.hutchinson(_nonconvex, distribution=distribution)
    mean, sem = _sample_mean_and_sem(hessian_fn, params)
    _assert_unbiased(mean, sem, exact)
    if distribution == "rademacher":
        # u_i**2 == 1: the estimate's error comes from off-diagonal terms only; the x-y block couples.
        assert np.all(sem["x"] > 0)


def test_an_extra_argument_the_estimator_does_not_name_is_an_error_not_dropped():
    """A `loss_mask` meant for a logits_fn that calls it `mask` must not be dropped (that would count the
    padding); every extra argument reaches the function, and one it does not name is a TypeError."""
    def logits_fn(params, x, mask=None):
        logits = x @ params["w"]
        return logits if mask is None else (logits, mask)

    params, x = {"w": jnp.ones((3, 4))}, jnp.ones((2, 5, 3))
    padding = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], jnp.float32)
    gnb = sophia_jax.gauss_newton_bartlett(logits_fn)
    with pytest.raises(TypeError, match="loss_mask"):
        gnb(params, jax.random.PRNGKey(0), x=x, loss_mask=padding)
    hutchinson = sophia_jax.hutchinson(lambda p, scale: scale * jnp.sum(p["x"] ** 2))
    with pytest.raises(TypeError, match="step"):
        hutchinson({"x": jnp.ones(3)}, jax.random.PRNGKey(0), scale=2.0, step=3)
    # Those meant for other members of a chain are ignored only when the function says so.
    out = sophia_jax.hutchinson(lambda p, scale, **_: scale * jnp.sum(p["x"] ** 2))(
        {"x": jnp.ones(3)}, jax.random.PRNGKey(0), scale=2.0, step=3)
    np.testing.assert_allclose(out["x"], 4.0)


def test_gnb_reports_the_sampled_gradient_norm_before_its_clip():
    """with_stats: the same estimate, plus the norm of g_s before the clip (restated in NumPy) and whether
    the clip shrank it."""
    rng = np.random.default_rng(5)
    params = {"w": jnp.asarray(rng.standard_normal((3, 4)), jnp.float32)}
    x = jnp.asarray(rng.standard_normal((6, 3)), jnp.float32)
    key = jax.random.PRNGKey(3)

    def logits_fn(p, x):
        return x @ p["w"]

    labels = jax.random.categorical(key, logits_fn(params, x))
    probs = np.asarray(jax.nn.softmax(logits_fn(params, x)), np.float64)
    g = np.asarray(x, np.float64).T @ ((probs - np.eye(4)[np.asarray(labels)]) / 6)
    norm = np.linalg.norm(g)
    for clip, clipped in [(None, 0.0), (10 * norm, 0.0), (norm / 10, 1.0)]:
        estimator = sophia_jax.gauss_newton_bartlett(logits_fn, max_grad_norm=clip)
        h_hat, stats = estimator.with_stats(params, key, x=x)
        assert float(stats["grad_norm"]) == pytest.approx(norm, rel=1e-5)
        assert float(stats["clipped"]) == clipped and float(stats["positions"]) == 6
        shrink = 1.0 if not clipped else (clip / norm) ** 2
        np.testing.assert_allclose(h_hat["w"], 6 * g**2 * shrink, rtol=1e-4)
        np.testing.assert_array_equal(estimator(params, key, x=x)["w"], h_hat["w"])
