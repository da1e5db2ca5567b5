"""The Hessian estimators against exact computations, with tolerances from the sample count."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sophia_jax
from sophia_jax import estimators

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


def _labels(logits, key):
    """The documented sampling, restated: position t's label is argmax(logits_t + g_t), g_t Gumbel noise for
    all leading rows of that position drawn from fold_in(key, t). logits [..., T, V] -> int [..., T]."""
    logits = np.asarray(logits, np.float32)
    labels = np.zeros(logits.shape[:-1], np.int64)
    for t in range(logits.shape[-2]):
        noise = jax.random.gumbel(jax.random.fold_in(key, t), logits.shape[:-2] + logits.shape[-1:], jnp.float32)
        labels[..., t] = np.argmax(logits[..., t, :] + np.asarray(noise), axis=-1)
    return labels


def _softmax(logits):
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


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
    for i in range(M):  # microbatch i's positions are its rows, numbered 0, 1, ... within it
        rows = np.arange(i, N, M)
        labels[rows] = _labels(np.asarray(jnp.asarray(x[rows]) @ params["w"] + params["b"]), jax.random.fold_in(key, i))
    p = _softmax(logits)
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


def test_a_mask_under_another_name_is_refused_not_left_at_its_default():
    """The estimator passes the function exactly the arguments it names. A `loss_mask=` given for a logits_fn
    whose parameter is `mask` (with a default!) must not leave the mask unset and count the padding: the
    named parameter the call did not supply is a TypeError that names it and lists what was supplied."""
    def logits_fn(params, x, mask=None):
        logits = x @ params["w"]
        return logits if mask is None else (logits, mask)

    params, x = {"w": jnp.ones((3, 4))}, jnp.ones((2, 5, 3))
    padding = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], jnp.float32)
    gnb = sophia_jax.gauss_newton_bartlett(logits_fn)
    with pytest.raises(TypeError, match=r"names 'mask', which the call did not supply \(extra arguments supplied: "
                                        r"loss_mask, x\)"):
        gnb(params, jax.random.PRNGKey(0), x=x, loss_mask=padding)
    hutchinson = sophia_jax.hutchinson(lambda p, scale: scale * jnp.sum(p["x"] ** 2))
    with pytest.raises(TypeError, match="names 'scale'.*supplied: step"):
        hutchinson({"x": jnp.ones(3)}, jax.random.PRNGKey(0), step=3)


def test_the_function_gets_exactly_the_arguments_it_names():
    """optax's rule: arguments meant for other members of a chain are ignored. A function without **kwargs
    gets only its own; one with **kwargs gets them all; keywords bound by functools.partial stay bound."""
    seen = []

    def loss(p, scale):
        seen.append("scale")
        return scale * jnp.sum(p["x"] ** 2)

    key, params = jax.random.PRNGKey(0), {"x": jnp.ones(3)}
    np.testing.assert_allclose(sophia_jax.hutchinson(loss)(params, key, scale=2.0, value=1.0, step=3)["x"], 4.0)

    def loss_all(p, scale, **rest):
        assert set(rest) == {"value"}
        return scale * jnp.sum(p["x"] ** 2)

    np.testing.assert_allclose(sophia_jax.hutchinson(loss_all)(params, key, scale=2.0, value=1.0)["x"], 4.0)
    bound = functools.partial(lambda p, scale, power: scale * jnp.sum(p["x"] ** power), power=2)
    np.testing.assert_allclose(sophia_jax.hutchinson(bound)(params, key, scale=3.0, value=1.0)["x"], 6.0)
    with pytest.raises(TypeError, match="positional argument"):
        sophia_jax.hutchinson(lambda: 0.0)


@pytest.mark.parametrize("make, message", [
    (lambda: sophia_jax.gauss_newton_bartlett(lambda p: p, max_grad_norm=0.0),
     "gauss_newton_bartlett: max_grad_norm=0.0; use a positive norm"),
    (lambda: sophia_jax.gauss_newton_bartlett(lambda p: p, microbatches=0),
     "gauss_newton_bartlett: microbatches=0; use an integer >= 1"),
    (lambda: sophia_jax.gauss_newton_bartlett(lambda p: p, microbatches=2.0),
     "gauss_newton_bartlett: microbatches=2.0; use an integer >= 1"),
    (lambda: sophia_jax.gauss_newton_bartlett("logits"), "gauss_newton_bartlett: logits_fn must be a callable"),
    (lambda: sophia_jax.hutchinson(None), "hutchinson: loss_fn must be a callable"),
    (lambda: sophia_jax.hutchinson(lambda p: 0.0, distribution="uniform"), "hutchinson: distribution='uniform'"),
])
def test_estimator_arguments_are_checked_with_the_argument_named(make, message):
    with pytest.raises((ValueError, TypeError), match=re.escape(message)):
        make()


def test_gnb_reports_the_sampled_gradient_norm_before_its_clip():
    """with_stats: the same estimate, plus the norm of g_s before the clip (restated in NumPy) and whether
    the clip shrank it."""
    rng = np.random.default_rng(5)
    params = {"w": jnp.asarray(rng.standard_normal((3, 4)), jnp.float32)}
    x = jnp.asarray(rng.standard_normal((6, 3)), jnp.float32)
    key = jax.random.PRNGKey(3)

    def logits_fn(p, x):
        return x @ p["w"]

    labels = _labels(logits_fn(params, x), key)
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


# ------------------------------------------------------------------------------------------ chunked logits
B, T, H, W = 3, 13, 6, 7  # sequences, positions (13: not a multiple of the chunks below), hidden, vocabulary


def _sequence_model(seed=6):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, T, 5)).astype(np.float32)
    params = {"w1": rng.standard_normal((5, H)).astype(np.float32),
              "w2": rng.standard_normal((H, W)).astype(np.float32)}
    mask = (rng.random((B, T)) < 0.8).astype(np.float32)
    return x, params, mask


def _whole_logits(params, x, mask):
    return jnp.tanh(x @ params["w1"]) @ params["w2"], mask


def _chunked_logits(chunk):
    def logits_fn(params, x, mask):
        return sophia_jax.ChunkedLogits(jnp.tanh(x @ params["w1"]), lambda h: h @ params["w2"], mask, chunk)
    return logits_fn


@pytest.mark.parametrize("chunk", [1, 4, 5, 13, 20])
def test_chunked_estimate_is_the_whole_one_and_the_exact_sampled_label_gradient(chunk):
    """Same key: the chunked estimator samples the same labels as the unchunked one and returns the same
    h_hat (float32 rounding), and both equal N * g**2 of the sampled-label loss restated in float64 NumPy
    (labels by the documented sampling, the gradient of a tanh layer by hand); also with microbatches."""
    x, params, mask = _sequence_model()
    key = jax.random.PRNGKey(11)
    whole = sophia_jax.gauss_newton_bartlett(_whole_logits)(params, key, x=x, mask=mask)
    chunked = sophia_jax.gauss_newton_bartlett(_chunked_logits(chunk))(params, key, x=x, mask=mask)
    for name in params:
        np.testing.assert_allclose(chunked[name], whole[name], rtol=1e-5, atol=1e-9)

    hidden = np.tanh(x.astype(np.float64) @ params["w1"])
    labels = _labels(jnp.tanh(jnp.asarray(x) @ params["w1"]) @ params["w2"], key)
    n = mask.sum()
    dlogits = (_softmax(hidden @ params["w2"]) - np.eye(W)[labels]) * mask[..., None] / n
    dpre = (dlogits @ params["w2"].T) * (1 - hidden**2)
    g = {"w1": np.einsum("btd,bth->dh", x, dpre), "w2": np.einsum("bth,btv->hv", hidden, dlogits)}
    for name in params:
        np.testing.assert_allclose(chunked[name], n * g[name] ** 2, rtol=2e-4, atol=1e-9)

    micro_whole = sophia_jax.gauss_newton_bartlett(_whole_logits, microbatches=3)(params, key, x=x, mask=mask)
    micro_chunked = sophia_jax.gauss_newton_bartlett(_chunked_logits(chunk), microbatches=3)(params, key, x=x,
                                                                                           mask=mask)
    for name in params:
        np.testing.assert_allclose(micro_chunked[name], micro_whole[name], rtol=1e-5, atol=1e-9)
        assert not np.allclose(micro_whole[name], whole[name])  # other keys, other labels


def test_chunked_gnb_is_unbiased_for_the_gauss_newton_diagonal():
    x, params, mask = _softmax_regression(seed=2)

    def logits_fn(params, x, mask):  # the N rows as positions, 3 chunks of 5 (the last one 2 long)
        return sophia_jax.ChunkedLogits(jnp.asarray(x), lambda h: h @ params["w"] + params["b"], mask, chunk=5)

    mean, sem = _sample_mean_and_sem(sophia_jax.gauss_newton_bartlett(logits_fn), params, x=x, mask=mask)
    _assert_unbiased(mean, sem, _exact_gauss_newton_diag(x, params, mask))


def test_chunked_logits_are_never_built_whole():
    """XLA's memory analysis of the compiled estimator, 4 x 512 positions x 4096 classes: the float32 logits
    alone are 32 MiB, and the whole estimate's temporaries were 64 MiB (the logits and their gradient);
    chunks of 64 positions needed 12 MiB."""
    params = {"w": jax.ShapeDtypeStruct((16, 4096), jnp.float32)}
    x = jax.ShapeDtypeStruct((4, 512, 16), jnp.float32)

    def temporaries(chunk):
        def logits_fn(p, x):
            return sophia_jax.ChunkedLogits(x, lambda h: h @ p["w"], chunk=chunk)
        estimate = jax.jit(lambda p, x: sophia_jax.gauss_newton_bartlett(logits_fn)(p, jax.random.PRNGKey(0), x=x))
        return estimate.lower(params, x).compile().memory_analysis().temp_size_in_bytes / 2**20

    logits_mib = 4 * 512 * 4096 * 4 / 2**20
    whole, chunked = temporaries(0), temporaries(64)
    print(f"temporaries: whole {whole:.1f} MiB, chunks of 64 {chunked:.1f} MiB; logits {logits_mib:.0f} MiB")
    assert whole > logits_mib and chunked < logits_mib / 2 and chunked < whole / 4, (whole, chunked)


@pytest.mark.parametrize("shape", [pytest.param((37, 11), marks=pytest.mark.slow), (3, 37, 11),
                                   pytest.param((2, 3, 16, 5), marks=pytest.mark.slow)])
def test_both_ways_of_sampling_draw_the_documented_labels(shape):
    """sample_labels runs one of two programs by platform (all positions at once; groups of positions under
    lax.map, on CPU): both give the restated labels, for position counts that are and are not multiples of
    the group."""
    logits = jax.random.normal(jax.random.PRNGKey(1), shape)
    key, positions = jax.random.PRNGKey(9), jnp.arange(shape[-2])
    want = _labels(logits, key)
    for draw in (estimators._labels_at_once, estimators._labels_by_group):
        np.testing.assert_array_equal(jax.jit(draw)(logits, key, positions), want)
    np.testing.assert_array_equal(sophia_jax.sample_labels(logits, key), want)
    shifted = sophia_jax.sample_labels(logits[..., 5:, :], key, positions[5:])  # a later chunk: same labels
    np.testing.assert_array_equal(shifted, want[..., 5:])


def test_chunked_logits_mask_of_the_wrong_shape_is_refused():
    def logits_fn(p):
        return sophia_jax.ChunkedLogits(jnp.zeros((2, 6, 3)), lambda h: h @ p["w"], jnp.ones((2, 5)), chunk=4)

    with pytest.raises(ValueError, match=r"mask has shape \(2, 5\), expected the hidden states' leading shape "
                                         r"\(2, 6\)"):
        sophia_jax.gauss_newton_bartlett(logits_fn)({"w": jnp.zeros((3, 4))}, jax.random.PRNGKey(0))
