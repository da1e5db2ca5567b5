"""The optax contract: extra args, jit stability, convergence, inject_hyperparams, sharding, dtypes,
optax.tree.map_params, None leaves and masks, non-finite inputs, argument checks, update_hessian and
metrics."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import sophia_jax


def _sophia(state):
    return [s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, sophia_jax.SophiaState))
            if isinstance(s, sophia_jax.SophiaState)][0]


def test_estimator_runs_on_calls_k_2k_with_the_extra_args_of_that_call():
    b2, k = 0.9, 10

    def hessian_fn(params, key, step):  # `unrelated` is meant for another member of the chain: not passed
        return jax.tree.map(lambda p: jnp.full_like(p, step), params)

    opt = optax.chain(optax.clip_by_global_norm(1.0),
                      sophia_jax.sophia_g(1e-2, b2=b2, update_interval=k, hessian_fn=hessian_fn))
    params = {"w": jnp.ones(3)}
    state = opt.init(params)
    update = jax.jit(opt.update)
    for step in range(1, 26):
        _, state = update({"w": jnp.ones(3)}, state, params, step=step, unrelated=jnp.zeros(2))
    # Only the estimates made on calls 10 and 20 are in h.
    want = (1 - b2) * b2 * 10 + (1 - b2) * 20
    np.testing.assert_allclose(_sophia(state).h["w"], want, rtol=1e-6)
    assert int(_sophia(state).hessian_updates) == 2


def test_no_recompilation_on_later_calls():
    traces = []

    def hessian_fn(params, key, batch):
        return jax.tree.map(lambda p: p * 0 + jnp.mean(batch), params)

    opts = {
        "plain": sophia_jax.sophia_g(1e-2, hessian_fn=hessian_fn, update_interval=2),
        "injected": optax.inject_hyperparams(sophia_jax.sophia_g, static_args=("hessian_fn",))(
            learning_rate=1e-2, rho=0.05, hessian_fn=hessian_fn, update_interval=2),
        "bf16": sophia_jax.sophia_g(1e-2, hessian_fn=hessian_fn, update_interval=2, mu_dtype=jnp.bfloat16),
    }
    for name, opt in opts.items():
        traces.clear()

        @jax.jit
        def step(params, state, batch):
            traces.append(1)
            grads = jax.tree.map(jnp.ones_like, params)
            updates, state = opt.update(grads, state, params, batch=batch)
            return optax.apply_updates(params, updates), state

        params = {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)}
        state = opt.init(params)
        for _ in range(4):
            params, state = step(params, state, jnp.arange(5.0))
        assert len(traces) == 1, name


def _parabola(p):
    return jnp.sum((p["x"] - jnp.array([1.0, -2.0, 0.5])) ** 2)


def _rosenbrock(p):
    x, y = p["x"]
    return (1 - x) ** 2 + 100 * (y - x**2) ** 2


@pytest.mark.parametrize("f, x0, target, lr, k", [
    (_parabola, [0.0, 0.0, 0.0], [1.0, -2.0, 0.5], 0.03, 10),
    (_rosenbrock, [-1.2, 1.0], [1.0, 1.0], 0.1, 1),
])
def test_converges(f, x0, target, lr, k):
    opt = sophia_jax.sophia_h(lr, rho=0.01, weight_decay=0.0, update_interval=k,
                              hessian_fn=sophia_jax.hutchinson(f))

    @jax.jit
    def step(params, state):
        updates, state = opt.update(jax.grad(f)(params), state, params)
        return optax.apply_updates(params, updates), state

    params = {"x": jnp.array(x0)}
    state = opt.init(params)
    for _ in range(2000):
        params, state = step(params, state)
    np.testing.assert_allclose(params["x"], target, atol=1e-3)


def test_inject_hyperparams_changes_take_effect():
    opt = optax.inject_hyperparams(sophia_jax.sophia_g, static_args=("hessian_fn",))(
        learning_rate=0.1, rho=0.05, weight_decay=0.0, hessian_fn=None)
    params = {"w": jnp.zeros(4)}
    state = opt.init(params)
    state = sophia_jax.update_hessian(state, {"w": jnp.full(4, 1e4)})  # h = 100
    g = {"w": jnp.array([1.0, -1.0, 0.01, -0.01])}
    u1, state = opt.update(g, state, params)
    state.hyperparams["learning_rate"] = jnp.asarray(0.02)
    state.hyperparams["rho"] = jnp.asarray(0.5)
    u2, state = opt.update(g, state, params)
    m1, m2 = 0.035 * g["w"], (0.965 * 0.035 + 0.035) * g["w"]
    np.testing.assert_allclose(u1["w"], -0.1 * np.clip(m1 / (0.05 * 100), -1, 1), rtol=1e-5)
    np.testing.assert_allclose(u2["w"], -0.02 * np.clip(m2 / (0.5 * 100), -1, 1), rtol=1e-5)


def _logits_fn(params, x):
    return jnp.tanh(x @ params["w1"]) @ params["w2"]


def test_sharded_update_equals_unsharded():
    assert jax.device_count() == 8
    rng = np.random.default_rng(0)
    params = {"w1": rng.standard_normal((16, 32)).astype(np.float32) * 0.3,
              "w2": rng.standard_normal((32, 8)).astype(np.float32) * 0.3}
    x = rng.standard_normal((64, 16)).astype(np.float32)
    opt = optax.chain(optax.clip_by_global_norm(1.0),
                      sophia_jax.sophia_g(1e-2, update_interval=2,
                                          hessian_fn=sophia_jax.gauss_newton_bartlett(_logits_fn)))

    def loss(params, x):
        return jnp.mean(jnp.square(_logits_fn(params, x)))

    def run(params, x):
        step = jax.jit(lambda p, s, x: opt.update(jax.grad(loss)(p, x), s, p, x=x), donate_argnums=1)
        state = opt.init(params)
        for _ in range(4):
            updates, state = step(params, state, x)
            params = optax.apply_updates(params, updates)
        return params, state

    want_params, want_state = run(jax.tree.map(jnp.asarray, params), jnp.asarray(x))

    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    specs = {"w1": P(None, "model"), "w2": P("model", None)}
    sharded = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in params.items()}
    x_sharded = jax.device_put(x, NamedSharding(mesh, P("data", None)))
    got_params, got_state = run(sharded, x_sharded)

    for k in params:
        np.testing.assert_allclose(got_params[k], want_params[k], rtol=1e-5, atol=1e-6)
        assert got_params[k].sharding.is_equivalent_to(sharded[k].sharding, 2)
    got, want = _sophia(got_state), _sophia(want_state)
    assert int(got.hessian_updates) == 2
    for k in params:
        np.testing.assert_allclose(got.h[k], want.h[k], rtol=1e-4, atol=1e-7)
        assert got.mu[k].sharding.is_equivalent_to(sharded[k].sharding, 2)
        assert got.h[k].sharding.is_equivalent_to(sharded[k].sharding, 2)
    assert jax.tree.structure(got_state) == jax.tree.structure(want_state)
    assert jax.tree.map(lambda a: a.dtype, got_state) == jax.tree.map(lambda a: a.dtype, want_state)


def test_bf16_params_and_bf16_momentum_track_float32():
    rng = np.random.default_rng(1)
    p32 = {"w": jnp.asarray(rng.standard_normal((8, 8)), jnp.float32)}
    g = jnp.asarray(rng.standard_normal((8, 8)), jnp.float32)

    def run(dtype, mu_dtype):
        opt = sophia_jax.sophia_g(1e-2, update_interval=2, mu_dtype=mu_dtype,
                                  hessian_fn=lambda p, key: jax.tree.map(lambda a: 0.5 * a * a + 1, p))
        params = jax.tree.map(lambda a: a.astype(dtype), p32)
        state = opt.init(params)
        for _ in range(10):
            updates, state = jax.jit(opt.update)({"w": g.astype(dtype) + params["w"]}, state, params)
            assert updates["w"].dtype == dtype
            params = optax.apply_updates(params, updates)
        return params, _sophia(state)

    p_bf16, s_bf16 = run(jnp.bfloat16, jnp.bfloat16)
    p_f32, _ = run(jnp.float32, None)
    assert p_bf16["w"].dtype == s_bf16.mu["w"].dtype == s_bf16.h["w"].dtype == jnp.bfloat16
    np.testing.assert_allclose(p_bf16["w"].astype(np.float32), p_f32["w"], atol=0.05)


def test_none_leaves_and_weight_decay_mask():
    params = {"w": jnp.full(3, 2.0), "b": jnp.full(3, 2.0), "frozen": None}
    mask = {"w": True, "b": False, "frozen": None}
    opt = sophia_jax.sophia_g(0.1, weight_decay=0.5, weight_decay_mask=mask)
    state = opt.init(params)
    grads = {"w": jnp.ones(3), "b": jnp.ones(3), "frozen": None}
    updates, state = opt.update(grads, state, params)
    assert updates["frozen"] is None and _sophia(state).mu["frozen"] is None
    # h = 0: clipped sign step of size lr, plus lr * wd * p only where the mask says so.
    np.testing.assert_allclose(updates["w"], -0.1 * (1 + 0.5 * 2.0))
    np.testing.assert_allclose(updates["b"], -0.1)


def test_non_finite_estimate_is_skipped_and_counted():
    calls = iter([jnp.nan, 4.0, jnp.inf])
    values = [next(calls) for _ in range(3)]
    opt = sophia_jax.scale_by_sophia(b2=0.5, update_interval=1,
                                     hessian_fn=lambda p, key, v: jax.tree.map(lambda a: a * 0 + v, p))
    params = {"w": jnp.ones(2)}
    state = opt.init(params)
    for v in values:
        _, state = opt.update({"w": jnp.ones(2)}, state, params, v=v)
    np.testing.assert_allclose(state.h["w"], 2.0)  # only the 4.0 went in: 0.5 * 0 + 0.5 * 4
    assert (int(state.hessian_updates), int(state.hessian_skips)) == (1, 2)
    metrics = sophia_jax.metrics(state)
    assert int(metrics["hessian_skips"]) == 2


def test_non_finite_gradients_under_apply_if_finite_leave_the_state_clean():
    opt = optax.apply_if_finite(
        sophia_jax.sophia_g(0.1, update_interval=1,
                            hessian_fn=lambda p, key, v: jax.tree.map(lambda a: a * 0 + v, p)),
        max_consecutive_errors=5)
    params = {"w": jnp.ones(3)}
    state = opt.init(params)
    _, state = opt.update({"w": jnp.ones(3)}, state, params, v=1.0)
    before = _sophia(state)
    updates, state = opt.update({"w": jnp.array([1.0, jnp.nan, 1.0])}, state, params, v=jnp.nan)
    after = _sophia(state)
    np.testing.assert_array_equal(updates["w"], 0.0)
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(a, b)
    assert int(state.notfinite_count) == 1 and int(state.total_notfinite) == 1


def test_update_hessian_folds_into_a_chained_state_and_rejects_others():
    opt = optax.chain(optax.clip_by_global_norm(1.0), sophia_jax.sophia_g(1e-3, b2=0.8))
    params = {"w": jnp.ones(2)}
    state = sophia_jax.update_hessian(opt.init(params), {"w": jnp.array([5.0, 10.0])})
    state = sophia_jax.update_hessian(state, {"w": jnp.array([0.0, 10.0])})
    np.testing.assert_allclose(_sophia(state).h["w"], [0.8 * 0.2 * 5.0, 0.8 * 0.2 * 10 + 0.2 * 10], rtol=1e-6)
    with pytest.raises(ValueError, match="exactly one SophiaState"):
        sophia_jax.update_hessian(optax.adam(1e-3).init(params), {"w": jnp.ones(2)})


def test_metrics_match_a_numpy_count():
    rng = np.random.default_rng(2)
    rho = 0.05
    opt = sophia_jax.sophia_g(1e-3, rho=rho)
    params = {"a": jnp.zeros((20, 10)), "b": jnp.zeros(7)}
    state = opt.init(params)
    h = {k: jnp.asarray(rng.uniform(0, 20, v.shape), jnp.float32) for k, v in params.items()}
    state = sophia_jax.update_hessian(state, h)  # h <- 0.01 * h
    grads = {k: jnp.asarray(rng.standard_normal(v.shape), jnp.float32) for k, v in params.items()}
    _, state = opt.update(grads, state, params)
    m = {k: 0.035 * np.asarray(grads[k]) for k in grads}
    wins = sum(np.sum(np.abs(m[k]) < rho * 0.01 * np.asarray(h[k])) for k in m)
    metrics = sophia_jax.metrics(state)
    assert float(metrics["win_rate"]) == pytest.approx(wins / 207, abs=1e-6)
    assert 0 < wins < 207
    assert float(metrics["momentum_norm"]) == pytest.approx(
        np.sqrt(sum(np.sum(v.astype(np.float64) ** 2) for v in m.values())), rel=1e-5)


def test_win_rate_is_the_clipping_the_update_applied_not_the_refreshed_one():
    """On a refresh call, the update uses h from before the refresh: with h = 0 every coordinate is
    clipped (win rate 0), even though the h the refresh leaves behind would clip none."""
    params = {"w": jnp.ones(5), "b": jnp.ones(3)}
    opt = sophia_jax.sophia_g(1e-3, rho=0.05, update_interval=1,
                              hessian_fn=lambda p, key: jax.tree.map(lambda a: jnp.full_like(a, 1e9), p))
    state = opt.init(params)
    grads = {"w": jnp.full(5, 0.1), "b": jnp.full(3, -0.1)}
    updates, state = opt.update(grads, state, params)
    np.testing.assert_allclose(updates["w"], -1e-3 * (1 + 0.1 * 1.0), rtol=1e-6)  # clipped: sign step + decay
    assert float(_sophia(state).h["w"][0]) > 0  # refreshed after the update
    assert float(sophia_jax.metrics(state)["win_rate"]) == 0.0
    updates, state = opt.update(grads, state, params)  # now preconditioned by the large h: nothing clipped
    assert float(sophia_jax.metrics(state)["win_rate"]) == 1.0


def test_metrics_by_parameter_group_match_a_numpy_count():
    rng = np.random.default_rng(3)
    params = {"a": jnp.zeros((6, 5)), "b": jnp.zeros(4), "c": jnp.zeros(9)}
    opt = sophia_jax.scale_by_sophia(rho=1.0)
    state = sophia_jax.update_hessian(opt.init(params), {k: jnp.full(v.shape, 100.0) for k, v in params.items()})
    grads = {k: jnp.asarray(30 * rng.standard_normal(v.shape), jnp.float32) for k, v in params.items()}
    _, state = opt.update(grads, state, params)
    mu = {k: 0.035 * np.asarray(g) for k, g in grads.items()}  # h = 0.01 * 100 = 1: unclipped iff |m| < 1
    won = {k: np.mean(np.abs(v) < 1.0) for k, v in mu.items()}
    out = sophia_jax.metrics(state, groups={"a": "matrix", "b": "vector", "c": "vector"})
    assert 0 < won["a"] < 1
    assert float(out["win_rate/matrix"]) == pytest.approx(won["a"], abs=1e-6)
    assert float(out["win_rate/vector"]) == pytest.approx((4 * won["b"] + 9 * won["c"]) / 13, abs=1e-6)
    assert float(out["win_rate"]) == pytest.approx((30 * won["a"] + 4 * won["b"] + 9 * won["c"]) / 43, abs=1e-6)
    assert float(out["hessian_max"]) == pytest.approx(1.0) and float(out["hessian_mean"]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="one group name per parameter"):
        sophia_jax.metrics(state, groups={"a": "x"})


def test_metrics_trace_for_more_than_2_to_the_31_coordinates():
    # A 6.6B model has more coordinates than an int32 holds; trace only (nothing is allocated).
    params = {"a": jax.ShapeDtypeStruct((2**31,), jnp.float32), "b": jax.ShapeDtypeStruct((2**30,), jnp.float32)}
    state = jax.eval_shape(sophia_jax.scale_by_sophia().init, params)
    out = jax.eval_shape(sophia_jax.metrics, state)
    assert out["win_rate"].shape == () and out["win_rate"].dtype == jnp.float32


def test_hessian_fn_without_params_is_a_clear_error():
    opt = sophia_jax.sophia_g(1e-3, hessian_fn=lambda p, key: p)
    state = opt.init({"w": jnp.ones(2)})
    with pytest.raises(ValueError, match="needs params"):
        opt.update({"w": jnp.ones(2)}, state)


def _logits(params, inputs):
    return jnp.tanh(inputs @ params["w1"]) @ params["w2"]


def test_composes_with_reduce_on_plateau_and_its_value_argument():
    """optax's rule: a member of a chain ignores the extra arguments meant for others. The GNB estimator's
    logits_fn names `inputs`; `value` is reduce_on_plateau's. The h folded in is the estimator's own."""
    rng = np.random.default_rng(4)
    params = {"w1": jnp.asarray(rng.standard_normal((5, 6)), jnp.float32) * 0.5,
              "w2": jnp.asarray(rng.standard_normal((6, 4)), jnp.float32) * 0.5}
    inputs = jnp.asarray(rng.standard_normal((8, 5)), jnp.float32)
    gnb = sophia_jax.gauss_newton_bartlett(_logits)
    opt = optax.chain(sophia_jax.sophia_g(1e-2, update_interval=1, seed=3, hessian_fn=gnb),
                      optax.contrib.reduce_on_plateau(patience=1, factor=0.5))
    state = opt.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    with jax.numpy_dtype_promotion("standard"):  # reduce_on_plateau mixes int32 and float32 (optax's code)
        updates, state = jax.jit(opt.update)(grads, state, params, inputs=inputs, value=jnp.asarray(2.0))
    _, subkey = jax.random.split(jax.random.PRNGKey(3))
    want = gnb(params, subkey, inputs=inputs)
    for name in params:
        np.testing.assert_allclose(_sophia(state).h[name], 0.01 * want[name], rtol=1e-4)
    assert float(state[1].best_value) == 2.0  # reduce_on_plateau saw its value


def test_a_mask_passed_under_the_wrong_name_is_refused_through_update():
    def logits_fn(params, inputs, mask=None):
        logits = _logits(params, inputs)
        return logits if mask is None else (logits, mask)

    params = {"w1": jnp.ones((5, 6)), "w2": jnp.ones((6, 4))}
    opt = sophia_jax.sophia_g(1e-2, update_interval=10, hessian_fn=sophia_jax.gauss_newton_bartlett(logits_fn))
    state = opt.init(params)
    with pytest.raises(TypeError, match=r"logits_fn names 'mask'.*supplied: inputs, loss_mask"):
        opt.update(params, state, params, inputs=jnp.ones((8, 5)), loss_mask=jnp.ones(8))  # on call 1 of 10
    plain = sophia_jax.scale_by_sophia(hessian_fn=lambda p, key, batch: p)
    with pytest.raises(TypeError, match=r"hessian_fn names 'batch'.*supplied: value"):
        plain.update(params, plain.init(params), params, value=1.0)


@pytest.mark.parametrize("make", [
    lambda: sophia_jax.sophia_g(1e-3),
    lambda: sophia_jax.sophia_h(1e-3, hessian_fn=sophia_jax.hutchinson(lambda p: sum(jnp.sum(x**2) for x in
                                                                                      jax.tree.leaves(p)))),
    lambda: optax.chain(optax.clip_by_global_norm(1.0), sophia_jax.sophia_g(
        1e-3, hessian_fn=sophia_jax.gauss_newton_bartlett(_logits), mu_dtype=jnp.float32)),
])
def test_map_params_casts_the_state_like_params(make):
    """optax.tree.map_params (to cast or shard a state like the params) reaches m and h, and only them."""
    opt = make()
    params = {"w1": jnp.ones((5, 6)), "w2": jnp.ones((6, 4))}
    state = opt.init(params)
    _, state = opt.update(params, state, params, inputs=jnp.ones((8, 5)))
    cast = optax.tree.map_params(opt, lambda p: p.astype(jnp.bfloat16), state)
    sophia, before = _sophia(cast), _sophia(state)
    for tree in (sophia.mu, sophia.h):
        assert {a.dtype for a in jax.tree.leaves(tree)} == {jnp.dtype(jnp.bfloat16)}
    for field in set(sophia._fields) - {"mu", "h"}:
        a, b = getattr(sophia, field), getattr(before, field)
        assert jax.tree.map(lambda x: x.dtype, a) == jax.tree.map(lambda x: x.dtype, b), field
    # The same rule as optax.adamw's: every leaf shaped like params is cast.
    adam = optax.adamw(1e-3)
    cast_adam = optax.tree.map_params(adam, lambda p: p.astype(jnp.bfloat16), adam.init(params))
    assert cast_adam[0].mu["w1"].dtype == jnp.bfloat16


@pytest.mark.parametrize("kwargs, message", [
    ({"update_interval": 0}, "update_interval=0; use an integer k >= 1"),
    ({"update_interval": -3}, "update_interval=-3; use an integer k >= 1"),
    ({"update_interval": 2.5}, "update_interval=2.5; use an integer k >= 1"),
    ({"rho": 0.0}, "rho=0.0; use a positive rho"),
    ({"rho": -0.1}, "rho=-0.1; use a positive rho"),
    ({"b1": 1.0}, "b1=1.0; use an EMA rate in [0, 1)"),
    ({"b2": -0.01}, "b2=-0.01; use an EMA rate in [0, 1)"),
    ({"b2": 1.5}, "b2=1.5; use an EMA rate in [0, 1)"),
    ({"eps": -1e-12}, "eps=-1e-12; use eps >= 0"),
    ({"clip_threshold": 0.0}, "clip_threshold=0.0; use a positive threshold, or None"),
    ({"hessian_fn": "gnb"}, "hessian_fn must be a callable or None"),
])
def test_bad_hyperparameters_are_refused_with_the_argument_named(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=re.escape(f"scale_by_sophia: {message}")):
        sophia_jax.scale_by_sophia(**kwargs)
    if "hessian_fn" not in kwargs:
        with pytest.raises(ValueError, match=re.escape(f"sophia_g: {message}")):
            sophia_jax.sophia_g(1e-3, **kwargs)
        with pytest.raises(ValueError, match=re.escape(f"sophia_g: {message}")):
            sophia_jax.sophia_h(1e-3, **kwargs)
    with pytest.raises(ValueError, match=re.escape("sophia_g: weight_decay=-0.1; use a weight decay >= 0")):
        sophia_jax.sophia_g(1e-3, weight_decay=-0.1)
    with pytest.raises(ValueError, match=re.escape("sophia_g: learning_rate=-0.001; use a learning rate >= 0")):
        sophia_jax.sophia_g(-1e-3)


def test_hyperparameters_that_are_arrays_or_tracers_are_not_checked():
    """Under inject_hyperparams the hyperparameters (update_interval included) are arrays, and inside jit
    tracers: not compared in Python."""
    opt = optax.inject_hyperparams(sophia_jax.sophia_g)(learning_rate=0.1, rho=0.05, update_interval=2, b2=0.9)
    params = {"w": jnp.ones(3)}
    state = opt.init(params)
    assert isinstance(state.hyperparams["update_interval"], jax.Array)
    _, state = jax.jit(opt.update)({"w": jnp.ones(3)}, state, params)
    assert int(_sophia(state).count) == 1
    jax.jit(lambda rho: sophia_jax.scale_by_sophia(rho=rho).init(params))(jnp.asarray(0.1))


def test_win_rate_after_update_hessian_is_still_the_clipping_that_update_applied():
    """The separate Hessian step (update_hessian after the update, the official order): metrics report the
    clipping the update applied, with the h it used; the next update reports its own."""
    params = {"w": jnp.ones(4), "b": jnp.ones(2)}
    opt = sophia_jax.sophia_g(1e-3, rho=0.05)
    state = sophia_jax.update_hessian(opt.init(params), {"w": jnp.full(4, 100.0), "b": jnp.full(2, 100.0)})
    grads = {"w": jnp.array([0.1, 0.1, 10.0, 10.0]), "b": jnp.array([0.1, 10.0])}
    _, state = opt.update(grads, state, params)  # h = 1: |m| = 0.0035 unclipped, 0.35 clipped (rho h = 0.05)
    assert float(sophia_jax.metrics(state)["win_rate"]) == pytest.approx(0.5)
    state = sophia_jax.update_hessian(state, {"w": jnp.full(4, 1e6), "b": jnp.full(2, 1e6)})  # would clip none
    state = sophia_jax.update_hessian(state, {"w": jnp.full(4, 1e6), "b": jnp.full(2, 1e6)})
    assert float(sophia_jax.metrics(state)["win_rate"]) == pytest.approx(0.5)
    _, state = opt.update(grads, state, params)
    assert float(sophia_jax.metrics(state)["win_rate"]) == 1.0


def test_the_estimators_statistics_of_the_latest_refresh_are_in_the_metrics():
    """An estimator with with_stats given as hessian_fn (the trainer's hessian_mode 'cond'): its sampled-label
    gradient norm and clip flag of the latest refresh, as the estimator computes them on that call's key."""
    rng = np.random.default_rng(5)
    params = {"w1": jnp.asarray(rng.standard_normal((5, 6)), jnp.float32),
              "w2": jnp.asarray(rng.standard_normal((6, 4)), jnp.float32)}
    inputs = jnp.asarray(rng.standard_normal((8, 5)), jnp.float32)
    gnb = sophia_jax.gauss_newton_bartlett(_logits, max_grad_norm=1e-3)
    opt = sophia_jax.sophia_g(1e-2, update_interval=2, seed=7, hessian_fn=gnb)
    state = opt.init(params)
    assert float(sophia_jax.metrics(state)["estimator/grad_norm"]) == 0.0
    for _ in range(2):
        _, state = opt.update(jax.tree.map(jnp.ones_like, params), state, params, inputs=inputs)
    _, subkey = jax.random.split(jax.random.PRNGKey(7))
    _, stats = gnb.with_stats(params, subkey, inputs=inputs)
    got = sophia_jax.metrics(state)
    assert float(got["estimator/grad_norm"]) == pytest.approx(float(stats["grad_norm"]), rel=1e-6)
    assert float(got["estimator/grad_norm"]) > 1e-3 and float(got["estimator/clipped"]) == 1.0
    assert float(got["estimator/positions"]) == 8
