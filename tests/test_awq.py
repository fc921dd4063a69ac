"""Weight quantisation (serve/awq.py): codes round-trip within half a step, int4 packing is exact,
folding AWQ's scales leaves the float model unchanged, AWQ beats round-to-nearest on held-out
activations with a few large channels, and adapters are merged before quantisation unless the router
gates them: then they stay unmerged and float, AWQ's scales fold into their LoRA factors exactly, and
the served model (adapters and router on) stays close to the float one.

Models are built abstractly and filled with numpy parameters (eager initialisation would compile a
random sampler per shape, which dominates tests this small).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import micro_config
from quietreasoning.config import ConfigError
from quietreasoning.model.trunk import attention_mask
from quietreasoning.serve import awq

F32 = "model.compute_dtype=float32"
PKM = ["model.pkm_layers=[1]", "model.pkm_slots=64", "model.pkm_topk=4", "model.pkm_key_dim=16",
       "model.pkm_value_dim=16", "model.pkm_heads=2"]
# the exported model of the stage plan, micro: workspace, a router gating two adapters (LoRA + IA3), PKM;
# chunks of 8 tokens, so each sequence gets 4 chunks and the router's gates differ between them
ROUTED = [F32, "model.adapters=[general,math]", "model.workspace=true", "model.router=true", "model.ws_layer=1",
          "model.ws_read_layers=[1]", "model.ws_chunk=8", *PKM, "serve.awq_group=32", "serve.awq_grid=4",
          "serve.awq_calib_batches=1"]


def _names(path) -> list:
    return [getattr(k, "key", None) for k in path]


def _filled(cfg, seed=0, outliers=True):
    """A trunk of `cfg.model` with random weights; with `outliers`, each RMSNorm has a few channels
    ten times larger, as trained models do (so activation-aware scales matter). A router's weights
    are large enough that its gates differ clearly between chunks."""
    model = awq.empty_trunk(cfg.model)
    rng = np.random.default_rng(seed)

    def value(path, x):
        names = _names(path)
        if names[-1] == "scale":
            scale = np.ones(x.shape)
            if outliers:
                scale[rng.choice(x.shape[0], 3, replace=False)] = 10.0
            return jnp.asarray(scale, jnp.float32)
        if "ia3" in names:
            return jnp.asarray(rng.normal(1.0, 0.2, x.shape), jnp.float32)
        std = 1.0 if names[-1] == "embed" else 0.05 if names[-1] == "b" else 0.02
        if names[-2:] == ["router", "w_out"]:  # large enough that the gates differ clearly between chunks
            std = 0.5
        return jnp.asarray(rng.normal(0.0, std, x.shape), jnp.float32)

    nnx.update(model, jax.tree_util.tree_map_with_path(value, nnx.to_pure_dict(nnx.state(model, nnx.Param))))
    return model


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, tokens, segment_ids, positions):
    return nnx.merge(graphdef, state)(tokens, segment_ids, positions)


@functools.partial(jax.jit, static_argnums=0)
def _gated_logits(graphdef, state, tokens, segment_ids, positions, gates):
    """The adapted trunk with every block's adapter gates fixed to `gates` (n_adapters,)."""
    model = nnx.merge(graphdef, state)
    gates = jnp.broadcast_to(gates, (*tokens.shape, gates.shape[0]))
    x = model.embed_tokens(tokens)
    for block in model.blocks:
        x = block(x, positions, attention_mask(segment_ids), gates)
    return model.logits(model.final_norm(x))


@functools.partial(jax.jit, static_argnums=0)
def _routed(graphdef, state, tokens, segment_ids, positions):
    """(logits, the router's adapter gates (B, C, n_adapters))."""
    model = nnx.merge(graphdef, state)
    h, aux = model.forward(tokens, segment_ids, positions)
    return model.logits(h), aux["router"]["gates"]["adapters"]


def _logits(model, batch):
    """Trunk.__call__ on a calibration-style batch, jitted (eager dispatch is slow at first use)."""
    inputs = (jnp.asarray(batch[k]) for k in ("inputs", "segment_ids", "positions"))
    return np.asarray(_forward(*nnx.split(model), *inputs))


@pytest.fixture(scope="module")
def calibrated():
    """(cfg, model with outlier channels, calibration batches, activations)."""
    cfg = micro_config(F32, "serve.awq_group=32", "serve.awq_grid=10", "serve.awq_calib_batches=2")
    model = _filled(cfg)
    batches = awq.calibration_batches(cfg)
    return cfg, model, batches, awq.calibrate(model, batches, search_tokens=512)


@pytest.mark.parametrize("bits", [8, 4])
def test_codes_round_trip_within_half_a_step_per_element(bits):
    rng = np.random.default_rng(bits)
    w = jnp.asarray(rng.normal(0.0, 0.02, (96, 40)) + rng.normal(0.0, 0.01, (1, 40)), jnp.float32)
    q = awq.quantize_weight(w, bits, 64)  # 64 does not divide 96: the group falls back to 48
    assert q.group == awq.resolve_group(96, 64) == 48 and q.scales.shape == q.zeros.shape == (2, 40)
    assert q.codes.dtype == jnp.uint8 and q.codes.shape == ((48, 40) if bits == 4 else (96, 40))
    assert int(jnp.max(awq.unpack_int4(q.codes, 96) if bits == 4 else q.codes)) < 2 ** bits
    step = np.repeat(np.asarray(q.scales), 48, axis=0)  # the step of each element's group
    error = np.abs(np.asarray(awq.dequantize_weight(q)) - np.asarray(w))
    assert np.all(error <= 0.5 * step * (1 + 1e-5) + 1e-9)
    assert error.max() > 0.1 * step.max()  # it really rounds
    np.testing.assert_array_equal(awq.fake_quantize(w, bits, 64), awq.dequantize_weight(q))
    with pytest.raises(ConfigError, match="one of"):
        awq.quantize_weight(w, 3, 64)


def test_int4_packing_round_trip_is_exact():
    codes = jnp.asarray(np.random.default_rng(0).integers(0, 16, (7, 5)), jnp.uint8)  # odd rows
    packed = awq.pack_int4(codes)
    assert packed.shape == (4, 5) and packed.dtype == jnp.uint8
    np.testing.assert_array_equal(awq.unpack_int4(packed, 7), codes)
    np.testing.assert_array_equal(packed[0], codes[0] | (codes[1] << 4))  # row 2i low, 2i + 1 high


def test_folding_the_scales_leaves_the_float_model_unchanged(calibrated):
    cfg, model, batches, acts = calibrated
    params = awq.merged_params(model, cfg)
    folded, report = awq.awq_fold(params, acts, cfg.model, 4, 32, cfg.serve.awq_grid)
    assert {r["matrices"] for r in report} == {"o", "down", "qkv", "gate_up"} and len(report) == 4 * cfg.model.n_layers
    assert any(r["alpha"] > 0 for r in report)  # some scales are not 1, so the check below means something
    assert all(r["awq_error"] <= r["rtn_error"] for r in report)
    assert not np.allclose(folded["blocks"][0]["attn_norm"]["scale"], params["blocks"][0]["attn_norm"]["scale"])
    scaled = awq.empty_trunk(cfg.model)
    nnx.update(scaled, folded)
    np.testing.assert_allclose(_logits(scaled, batches[1]), _logits(model, batches[1]), rtol=1e-4, atol=1e-5)


def test_awq_error_is_below_round_to_nearest_on_held_out_activations_with_large_channels():
    rng = np.random.default_rng(0)
    channel_scale = np.ones(64)
    channel_scale[[5, 20, 41, 60]] = 30.0  # a few large channels
    x_cal, x_test = (jnp.asarray(rng.normal(0.0, 1.0, (512, 64)) * channel_scale, jnp.float32) for _ in range(2))
    w = jnp.asarray(rng.normal(0.0, 0.02, (64, 128)), jnp.float32)
    stat = jnp.mean(jnp.abs(x_cal), axis=0)
    s, alpha, err, rtn_err, _ = awq.search_scale(x_cal, stat, w, bits=4, group=32, grid=10)
    assert 0 < float(alpha) < 1 and float(err) < float(rtn_err)
    ref = x_test @ w
    awq_out = (x_test / s) @ awq.fake_quantize(w * s[:, None], 4, 32)
    rtn_out = x_test @ awq.fake_quantize(w, 4, 32)
    awq_test, rtn_test = (float(jnp.mean(jnp.square(out - ref))) for out in (awq_out, rtn_out))
    assert awq_test < 0.8 * rtn_test, (awq_test, rtn_test)


def test_quantized_model_dequantizes_into_a_fresh_trunk_close_to_the_float_model(calibrated):
    cfg, model, batches, _ = calibrated
    expected = _logits(model, batches[1])
    errors = {}
    for method, bits in (("rtn", 8), ("awq", 4), ("rtn", 4)):
        tree, report = awq.quantize_model(model, cfg, batches, bits, method=method, search_tokens=512)
        assert report["groups"] == {"64": 32, "128": 32} and report["quantized_bytes"] < report["float_bytes"]
        q = tree["blocks"][1]["mlp"]["w_down"]
        assert isinstance(q, awq.QuantizedWeight) and q.bits == bits and q.shape == (128, 64)
        served = awq.empty_trunk(cfg.model)
        awq.dequantize_into(served, tree)
        np.testing.assert_array_equal(served.blocks[1].mlp.w_down[...], awq.dequantize_weight(q))
        errors[method, bits] = np.mean(np.abs(_logits(served, batches[1]) - expected))
    assert errors["rtn", 8] < errors["awq", 4] < errors["rtn", 4], errors
    assert errors["awq", 4] < 0.1 * np.mean(np.abs(expected))
    with pytest.raises(ConfigError, match="method"):
        awq.quantize_model(model, cfg, batches, 4, method="gptq")
    with pytest.raises(ValueError, match="no batches"):
        awq.quantize_model(model, cfg, [], 4)


def test_adapters_merged_before_quantisation_give_the_unmerged_output_with_that_adapter_selected():
    cfg = micro_config(F32, "model.adapters=[general,math]", "serve.awq_calib_batches=1")
    model = _filled(cfg, seed=1, outliers=False)
    bare = awq.serving_config(cfg)
    assert bare.model.adapters == () and bare.serve == cfg.serve
    batch = awq.calibration_batches(cfg)[0]
    tokens, seg, pos = (jnp.asarray(batch[k]) for k in ("inputs", "segment_ids", "positions"))
    math, uniform = (np.asarray(_gated_logits(*nnx.split(model), tokens, seg, pos, jnp.asarray(g)))
                     for g in ([0.0, 1.0], [0.5, 0.5]))
    assert np.abs(math - uniform).max() > 1e-3  # the selection matters
    for select, expected in (("math", math), (None, uniform)):  # None: the mixture the trunk computes ungated
        merged = awq.empty_trunk(bare.model)
        nnx.update(merged, awq.merged_params(model, cfg, select))
        np.testing.assert_allclose(_logits(merged, batch), expected, rtol=1e-5, atol=1e-5)

    tree, report = awq.quantize_model(model, cfg, None, 8, method="rtn", adapter="math")
    assert "adapters" not in tree["blocks"][0]
    assert report["adapters"] == {"names": ["general", "math"], "merged": True, "select": "math"}
    served = awq.empty_trunk(bare.model)
    awq.dequantize_into(served, tree)
    np.testing.assert_allclose(_logits(served, batch), math, atol=0.05 * np.abs(math).mean())


@pytest.fixture(scope="module")
def routed():
    """(cfg, the routed model (ROUTED) with outlier channels, one calibration batch)."""
    cfg = micro_config(*ROUTED)
    model = _filled(cfg, seed=2)
    batches = awq.calibration_batches(cfg)
    return cfg, model, batches


def _inputs(batch):
    return tuple(jnp.asarray(batch[k]) for k in ("inputs", "segment_ids", "positions"))


def test_with_the_router_on_the_adapters_stay_unmerged_and_folding_the_scales_into_lora_is_exact(routed):
    cfg, model, batches = routed
    assert awq.serving_config(cfg) == cfg  # the served model keeps the adapters and the router
    logits, gates = (np.asarray(a) for a in _routed(*nnx.split(model), *_inputs(batches[0])))
    assert gates.shape[1] == 4 and gates.std(axis=(0, 1)).max() > 0.03  # the mixture changes per chunk
    params = awq.merged_params(model, cfg)
    assert set(params["blocks"][0]["adapters"]) == {"lora", "ia3"}
    with pytest.raises(ConfigError, match="adapter='math'.*unmerged"):
        awq.merged_params(model, cfg, "math")

    acts = awq.calibrate(model, batches, search_tokens=256)
    folded, report = awq.awq_fold(params, acts, cfg.model, 4, 32, cfg.serve.awq_grid)
    assert any(r["alpha"] > 0 for r in report)
    lora, before = folded["blocks"][1]["adapters"]["lora"], params["blocks"][1]["adapters"]["lora"]
    for target, factor in (("wq", "a"), ("wo", "a"), ("w_down", "a"), ("wv", "b"), ("w_up", "b")):
        assert not np.allclose(lora[target][factor], before[target][factor]), (target, factor)
    np.testing.assert_array_equal(folded["blocks"][1]["adapters"]["ia3"]["ff"],  # IA3 commutes with the folds
                                  params["blocks"][1]["adapters"]["ia3"]["ff"])
    scaled = awq.empty_trunk(cfg.model)
    nnx.update(scaled, folded)
    np.testing.assert_allclose(_logits(scaled, batches[0]), logits, rtol=1e-4, atol=1e-5)


def test_a_routed_model_quantises_its_matmuls_keeps_its_adapters_float_and_serves_close_to_float(routed):
    cfg, model, batches = routed
    graphdef, state = nnx.split(model)
    expected = np.asarray(_routed(graphdef, state, *_inputs(batches[0]))[0])
    # what serving a fixed mixture would cost instead: the router's adapter logits (its last outputs) at 0
    n, uniform = len(cfg.model.adapters), nnx.to_pure_dict(state)  # (split copied the model's state)
    uniform["router"]["w_out"] = uniform["router"]["w_out"].at[:, -n:].set(0.0)
    uniform["router"]["b_out"] = uniform["router"]["b_out"].at[-n:].set(0.0)
    nnx.replace_by_pure_dict(state, uniform)
    ignored = np.mean(np.abs(np.asarray(_routed(graphdef, state, *_inputs(batches[0]))[0]) - expected))
    params = awq.merged_params(model, cfg)
    bank_bytes = awq.weight_bytes([b["adapters"] for b in params["blocks"].values()])
    for method in ("rtn", "awq"):
        tree, report = awq.quantize_model(model, cfg, batches, 8, method=method, search_tokens=256)
        assert report["adapters"] == {"names": ["general", "math"], "merged": False, "bytes": bank_bytes}
        block = tree["blocks"][1]
        assert all(isinstance(block[part][k], awq.QuantizedWeight) for part, k in (("attn", "wq"), ("mlp", "w_down")))
        bank = jax.tree.leaves(block["adapters"])  # a quantised leaf would flatten to its uint8 codes
        assert bank and all(x.dtype == jnp.float32 for x in bank)  # float, as the model holds it
        if method == "rtn":  # no scales folded: the bank is the model's own
            jax.tree.map(np.testing.assert_array_equal, block["adapters"], params["blocks"][1]["adapters"])
        assert report["quantized_bytes"] - report["matmul_quantized_bytes"] > bank_bytes  # counted in float
        served = awq.empty_trunk(awq.serving_config(cfg).model)
        awq.dequantize_into(served, tree)
        error = np.mean(np.abs(_logits(served, batches[0]) - expected))
        assert error < 0.01 * np.mean(np.abs(expected)) and error < 0.2 * ignored, (method, error, ignored)
