"""The SSM expert's invariants: the parallel scan is the one-step recurrence, causality,
segment resets in packed rows, gradients (nonzero, and equal to finite differences), names on
every parameter and the closed-form parameter count.

Inputs are built in numpy and every model call goes through one of a few jitted functions:
eager jax ops compile per shape, which would dominate the time of this file."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from helpers import micro_config
from quietreasoning.config import load_config
from quietreasoning.model.ssm import SSMExpert, selective_scan, ssm_param_count
from quietreasoning.training.sharding import RULES, logical_to_spec

T = 11  # with scan_chunk 4: three chunks, the last one padded


@functools.cache
def _setup():
    """One expert (d_model 64, state 16, dt rank 4) and jitted forward / decode over its parameters."""
    cfg = micro_config("model.compute_dtype=float32", "model.ssm_layers=[1]").model
    model = SSMExpert(cfg, rngs=nnx.Rngs(0), scan_chunk=4)
    graph, params = nnx.split(model)

    @jax.jit
    def forward(p, x, seg):
        return nnx.merge(graph, p)(x, seg)

    @jax.jit
    def decode(p, x):  # token by token through `step`, from `init_state`
        m = nnx.merge(graph, p)

        def one(state, xt):
            out, state = m.step(xt, state)
            return state, out
        _, outs = jax.lax.scan(one, m.init_state(x.shape[0]), jnp.moveaxis(x, 1, 0))
        return jnp.moveaxis(outs, 0, 1)

    return cfg, model, params, forward, decode


def _normal(seed, *shape):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _close(a, b, rtol=1e-5):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.abs(b).max())


def test_parallel_scan_equals_one_step_recurrence():
    cfg, _, params, forward, decode = _setup()
    x = _normal(0, 2, T, cfg.d_model)
    parallel = forward(params, x, np.ones((2, T), np.int32))
    assert parallel.shape == x.shape and parallel.dtype == jnp.float32
    _close(parallel, decode(params, x))


def test_chunked_scan_equals_a_plain_loop_for_any_chunk():
    b, t, i, n = 2, 7, 3, 4
    u, c, bm, h0 = _normal(1, b, t, i), _normal(2, b, t, n), _normal(3, b, t, n), _normal(4, b, i, n)
    dt = np.log1p(np.exp(_normal(5, b, t, i)))
    a = -np.exp(_normal(6, i, n))
    reset = np.zeros((b, t), bool)
    reset[0, 3] = True
    h, ys = h0.astype(np.float64), []
    for s in range(t):  # the recurrence written out, in float64
        decay = np.where(reset[:, s, None, None], 0.0, np.exp(dt[:, s, :, None] * a))
        h = decay * h + (dt[:, s] * u[:, s])[..., None] * bm[:, s, None, :]
        ys.append(np.einsum("bin,bn->bi", h, c[:, s]))
    scan = jax.jit(selective_scan, static_argnums=7)
    for chunk in (3, 64):  # several chunks with the last one padded; one chunk holding everything
        y, last = scan(u, dt, a, bm, c, reset, h0, chunk)
        _close(y, np.stack(ys, 1))
        _close(last, h)


def test_future_inputs_never_change_past_outputs():
    cfg, _, params, forward, _ = _setup()
    x = _normal(7, 2, T, cfg.d_model)
    seg = np.ones((2, T), np.int32)
    base = np.asarray(forward(params, x, seg))
    for cut in (2, 3, 7):  # inside a chunk, at a chunk's end, inside a later chunk
        changed = x.copy()
        changed[:, cut + 1:] += 3.0
        out = np.asarray(forward(params, changed, seg))
        np.testing.assert_array_equal(out[:, :cut + 1], base[:, :cut + 1])
        assert not np.allclose(out[:, cut + 1:], base[:, cut + 1:])


def test_segment_start_resets_state_and_conv():
    cfg, _, params, forward, _ = _setup()
    doc = _normal(8, 6, cfg.d_model)
    before = _normal(9, 2, 5, cfg.d_model)
    # row 0: another document, then doc (crossing the chunk boundary at 8); row 1: padding, then doc
    x = np.concatenate([before, np.stack([doc, doc])], axis=1)
    seg = np.array([[1] * 5 + [2] * 6, [0] * 5 + [1] * 6], np.int32)
    out = np.asarray(forward(params, x, seg))
    # doc with nothing before it; what follows it cannot matter (causality), and the shape is the same
    alone = np.concatenate([np.stack([doc, doc]), before], axis=1)
    alone = np.asarray(forward(params, alone, np.ones_like(seg)))[:, :6]
    _close(out[:, 5:], alone)
    # a different earlier document leaves the later one bit-for-bit unchanged
    other = x.copy()
    other[:, :5] *= -2.0
    np.testing.assert_array_equal(np.asarray(forward(params, other, seg))[:, 5:], out[:, 5:])
    # and without the boundary the earlier tokens do leak in: the reset is doing the work
    leaky = np.asarray(forward(params, x, np.ones_like(seg)))
    assert not np.allclose(leaky[:, 5:], out[:, 5:], rtol=1e-3, atol=0)


def test_gradients_reach_every_parameter_and_match_finite_differences():
    cfg, _, params, forward, _ = _setup()
    x = _normal(10, 2, T, cfg.d_model)
    seg = np.array([[1] * 6 + [2] * 5, [1] * T], np.int32)
    weights = _normal(11, 2, T, cfg.d_model)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    names = ["/".join(str(k.key) for k in path if hasattr(k, "key")) for path, _ in leaves]  # "a_log", "norm/scale"
    # larger steps, B, C and output than at init, so every path (the state's, A_log's) moves the
    # loss well above float32 rounding
    scale = {"dt_bias": (1.0, 2.0), "w_b": (10.0, 0.0), "w_c": (10.0, 0.0), "out": (30.0, 0.0)}
    values = [np.asarray(p) * scale.get(name, (1.0, 0.0))[0] + scale.get(name, (1.0, 0.0))[1]
              for name, (_, p) in zip(names, leaves)]
    build = lambda vs: jax.tree.unflatten(treedef, [v.astype(np.float32) for v in vs])

    grads = jax.jit(jax.grad(lambda p: jnp.sum(forward(p, x, seg) * weights)))(build(values))
    grads = [np.asarray(g, np.float64) for g in jax.tree.leaves(grads)]
    for name, g in zip(names, grads):
        assert np.all(np.isfinite(g)) and np.any(g != 0), name

    # central differences along directions half gradient, half random (so the derivative is not a
    # near-cancelling sum): all parameters at once, the softplus dt path, and A_log
    loss = lambda vs: np.sum(np.asarray(forward(build(vs), x, seg), np.float64) * weights)
    unit = lambda vs: [v / np.sqrt(sum(np.sum(w * w) for w in vs)) for v in vs]
    eps = 1e-2
    for i, prefix in enumerate(("", "dt_", "a_log")):
        mask = [name.startswith(prefix) for name in names]
        along = unit([g * m for g, m in zip(grads, mask)])
        noise = unit([np.random.default_rng(20 + i).standard_normal(v.shape) * m for v, m in zip(values, mask)])
        direction = [a + b for a, b in zip(along, noise)]
        analytic = sum(np.sum(g * v) for g, v in zip(grads, direction))
        numeric = (loss([p + eps * v for p, v in zip(values, direction)])
                   - loss([p - eps * v for p, v in zip(values, direction)])) / (2 * eps)
        np.testing.assert_allclose(numeric, analytic, rtol=1e-2, err_msg=prefix or "all")


def test_every_parameter_is_named_and_counted():
    cfg, model, *_ = _setup()
    counted = 0
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param):
            names = var.get_metadata().get("out_sharding")
            assert names is not None and len(names) == var[...].ndim, path
            assert all(name in RULES for name in names), (path, names)
            logical_to_spec(tuple(names))  # no mesh axis used twice
            counted += var[...].size
    assert counted == ssm_param_count(cfg)

    def abstract_count(m):  # nothing is allocated
        return sum(x.size for x in jax.tree.leaves(nnx.state(nnx.eval_shape(lambda: SSMExpert(m, rngs=nnx.Rngs(0))))))

    other = micro_config("model.ssm_expand=2", "model.ssm_dt_rank=3", "model.ssm_conv=3").model
    assert abstract_count(other) == ssm_param_count(other)
    big = load_config("3b").model  # d_model 2304, state 128, conv 4, dt rank ceil(2304 / 16) = 144
    assert abstract_count(big) == ssm_param_count(big) == 2304 + 3 * 2304 ** 2 + 2304 * (4 + 1 + 2 * 144 + 1 + 3 * 128 + 1)


def test_initialisation_follows_mamba():
    cfg, model, *_ = _setup()
    dt = np.log1p(np.exp(np.asarray(model.dt_bias[...], np.float64)))
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 1e-1 * 1.001
    a = -np.exp(np.asarray(model.a_log[...], np.float64))
    np.testing.assert_allclose(a, -np.broadcast_to(np.arange(1, cfg.ssm_state + 1), a.shape), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(model.d_skip[...]), 1.0)
