"""sophia_g against a NumPy restatement of the official PyTorch SophiaG loop (REFERENCE.md §1).

The official loop evaluates the sampled gradient g_s *after* step() has moved the params. A trainer
reproduces that exactly with `update_hessian` after `apply_updates` ("after_step"). The estimator run
inside `update` can only see the params the update is computed from, one step earlier ("before_step");
the NumPy loop then evaluates g_s there, and every other number must still agree.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sophia_jax

STEPS, K, TOKENS = 100, 10, 4096
LR, B1, B2, RHO, WD = 3e-2, 0.965, 0.99, 0.05, 0.2


def _problem(dtype):
    """Per-step gradient and sampled-gradient maps: g_t = A_t p + c_t, g_s = B_t p + d_t (per leaf)."""
    rng = np.random.default_rng(0)
    shapes = {"w": (6, 5), "b": (5,)}

    def draw(*shape):
        return rng.standard_normal(shape).astype(dtype)

    steps = []
    for _ in range(STEPS):
        steps.append({
            name: dict(A=draw(*shape) * 0.3, c=draw(*shape), B=draw(*shape) * 0.05, d=draw(*shape) * 0.01)
            for name, shape in shapes.items()
        })
    params = {name: draw(*shape) for name, shape in shapes.items()}
    return params, steps


def _official_numpy(params, steps, *, clip_norm, hessian_at, bias_correction=False):
    """The official loop: step() every iteration; update_hessian() after it when i % K == K - 1. With
    bias_correction (not the official rule) step() divides by rho * bs * hess / (1 - B2**n) after n refreshes."""
    p = {n: v.copy() for n, v in params.items()}
    m = {n: np.zeros_like(v) for n, v in p.items()}
    hess = {n: np.zeros_like(v) for n, v in p.items()}
    refreshes = 0
    for i, s in enumerate(steps):
        p_before = {n: v.copy() for n, v in p.items()}
        g = {n: s[n]["A"] * p[n] + s[n]["c"] for n in p}
        if clip_norm is not None:
            norm = np.sqrt(sum(np.sum(x.astype(np.float64) ** 2) for x in g.values()))
            g = {n: x * min(1.0, clip_norm / norm) for n, x in g.items()}
        for n in p:
            p[n] = p[n] * (1 - LR * WD)
            m[n] = B1 * m[n] + (1 - B1) * g[n]
            corrected = hess[n] / (1 - B2**refreshes) if bias_correction and refreshes else hess[n]
            ratio = np.minimum(np.abs(m[n]) / (RHO * TOKENS * corrected + 1e-15), 1)
            p[n] = p[n] - LR * np.sign(m[n]) * ratio
        if i % K == K - 1:
            at = p if hessian_at == "after_step" else p_before
            for n in p:
                g_s = s[n]["B"] * at[n] + s[n]["d"]
                hess[n] = B2 * hess[n] + (1 - B2) * g_s * g_s
            refreshes += 1
    return p, m, hess


def _sophia_jax(params, steps, *, clip_norm, hessian_at, bias_correction=False):
    def hessian_fn(params, key, B, d):  # `unused_extra_arg` is not the estimator's: not passed to it
        del key  # deterministic estimate for parity: TOKENS * g_s**2
        return {n: TOKENS * (B[n] * params[n] + d[n]) ** 2 for n in params}

    opt = sophia_jax.sophia_g(
        LR, b1=B1, b2=B2, rho=RHO, weight_decay=WD, eps=1e-15, update_interval=K,
        hessian_fn=hessian_fn if hessian_at == "before_step" else None, h_bias_correction=bias_correction,
    )
    if clip_norm is not None:
        opt = optax.chain(optax.clip_by_global_norm(clip_norm), opt)

    @jax.jit
    def step(params, state, s):
        grads = {n: s[n]["A"] * params[n] + s[n]["c"] for n in params}
        B = {n: s[n]["B"] for n in params}
        d = {n: s[n]["d"] for n in params}
        updates, state = opt.update(grads, state, params, B=B, d=d, unused_extra_arg=1.0)
        return optax.apply_updates(params, updates), state

    @jax.jit
    def hessian_step(params, state, s):
        B = {n: s[n]["B"] for n in params}
        d = {n: s[n]["d"] for n in params}
        return sophia_jax.update_hessian(state, hessian_fn(params, None, B, d))

    params = jax.tree.map(jnp.asarray, params)
    state = opt.init(params)
    for i, s in enumerate(steps):
        params, state = step(params, state, s)
        if hessian_at == "after_step" and i % K == K - 1:
            state = hessian_step(params, state, s)
    sophia = [x for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, sophia_jax.SophiaState))
              if isinstance(x, sophia_jax.SophiaState)][0]
    return params, sophia


@pytest.mark.parametrize("hessian_at", ["after_step", "before_step"])
@pytest.mark.parametrize("clip_norm", [None, 1.0])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_matches_official_rule(dtype, clip_norm, hessian_at):
    with jax.enable_x64(dtype == np.float64):
        params, steps = _problem(dtype)
        want_p, want_m, want_h = _official_numpy(params, steps, clip_norm=clip_norm, hessian_at=hessian_at)
        got_p, state = _sophia_jax(params, steps, clip_norm=clip_norm, hessian_at=hessian_at)
        atol = 1e-12 if dtype == np.float64 else 1e-4
        for n in want_p:
            assert got_p[n].dtype == dtype
            np.testing.assert_allclose(got_p[n], want_p[n], rtol=0, atol=atol)
            np.testing.assert_allclose(state.mu[n], want_m[n], rtol=0, atol=atol)
            # Our h is on the per-token scale: TOKENS * official EMA(g_s**2).
            np.testing.assert_allclose(state.h[n], TOKENS * want_h[n], rtol=1e-4 if dtype == np.float32 else 1e-10)
        assert int(state.count) == STEPS
        assert int(state.hessian_updates) == STEPS // K
        # The run exercised both regimes: some coordinates clipped, some not.
        win_rate = float(sophia_jax.metrics(state)["win_rate"])
        assert 0.0 < win_rate < 1.0


def test_first_k_steps_are_sign_momentum():
    """h starts at 0, so until the first estimate every coordinate moves by exactly lr."""
    params = {"w": jnp.zeros(7)}
    opt = sophia_jax.sophia_g(0.1, weight_decay=0.0, update_interval=3,
                              hessian_fn=lambda p, key: jax.tree.map(jnp.ones_like, p))
    state = opt.init(params)
    g = {"w": jnp.array([3.0, -2.0, 1e-6, -1e-6, 5.0, -0.5, 0.25])}
    for _ in range(3):
        updates, state = opt.update(g, state, params)
        np.testing.assert_allclose(updates["w"], -0.1 * np.sign(g["w"]), rtol=1e-6)
    # The 3rd call refreshed h (after computing its update), so the 4th is preconditioned.
    assert float(state[0].h["w"][0]) == pytest.approx(0.01)
    updates, _ = opt.update(g, state, params)
    m = g["w"] * (1 - 0.965**4)
    np.testing.assert_allclose(updates["w"], -0.1 * np.clip(m / (0.04 * 0.01 + 1e-12), -1, 1), rtol=1e-5)


@pytest.mark.parametrize("hessian_at", ["after_step", "before_step"])
def test_bias_corrected_h_matches_its_numpy_statement(hessian_at):
    """h_bias_correction (not the official rule): the same loop with h / (1 - b2**n) in the denominator,
    n = refreshes so far; h itself is stored uncorrected. float64, with the gradient clip."""
    with jax.enable_x64(True):
        params, steps = _problem(np.float64)
        want_p, want_m, want_h = _official_numpy(params, steps, clip_norm=1.0, hessian_at=hessian_at,
                                                 bias_correction=True)
        plain_p, _, _ = _official_numpy(params, steps, clip_norm=1.0, hessian_at=hessian_at)
        got_p, state = _sophia_jax(params, steps, clip_norm=1.0, hessian_at=hessian_at, bias_correction=True)
        for n in want_p:
            np.testing.assert_allclose(got_p[n], want_p[n], rtol=0, atol=1e-12)
            np.testing.assert_allclose(state.mu[n], want_m[n], rtol=0, atol=1e-12)
            np.testing.assert_allclose(state.h[n], TOKENS * want_h[n], rtol=1e-10)
        assert max(np.abs(want_p[n] - plain_p[n]).max() for n in want_p) > 1e-3  # the correction mattered
