"""The serving bundle (serve/bundle.py): export -> load gives exactly the model that dequantising in
memory gives (PKM int8 rows and the tokenizer included; a LatentReasoner keeps its projection and
heads), int4 < int8 < float on disk, a model whose router gates its adapters comes back with the
adapters unmerged and the router, and directories that are not complete bundles fail with one clear
line.
"""

import functools
import inspect
import json
import shutil
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import micro_config
from quietreasoning.config import ConfigError
from quietreasoning.model.latent import LatentReasoner
from quietreasoning.serve import awq
from quietreasoning.serve.bundle import MANIFEST, BundleError, Bundle, export_bundle, load_bundle
from quietreasoning.utils.tokenizer import train_tokenizer

VOCAB = 384  # room for a byte-fallback tokenizer: specials, 256 bytes, the characters of the text, merges
PKM = ["model.pkm_layers=[1]", "model.pkm_slots=64", "model.pkm_topk=4", "model.pkm_key_dim=16",
       "model.pkm_value_dim=16", "model.pkm_heads=2"]


def _random_fill(model, seed=0):
    """Normal(0, 0.05) values in every parameter of an abstract model (no initialiser compiles)."""
    rng = np.random.default_rng(seed)
    nnx.update(model, jax.tree.map(lambda x: jnp.asarray(rng.normal(0.0, 0.05, x.shape), x.dtype),
                                   nnx.to_pure_dict(nnx.state(model, nnx.Param))))
    return model


def _disk_bytes(path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, tokens, segment_ids, positions):
    return nnx.merge(graphdef, state)(tokens, segment_ids, positions)


def _logits(model, batch):
    inputs = (jnp.asarray(batch[k]) for k in ("inputs", "segment_ids", "positions"))
    return np.asarray(_forward(*nnx.split(model), *inputs))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(cfg, float model, calibration batches, tokenizer path, int4 AWQ bundle dir, its manifest)."""
    tmp = tmp_path_factory.mktemp("bundle")
    cfg = micro_config(f"model.vocab_size={VOCAB}", *PKM, "serve.awq_group=32", "serve.awq_grid=4",
                       "serve.awq_calib_batches=1", "serve.kv_bits=4")
    model = _random_fill(awq.empty_trunk(cfg.model))
    text = [inspect.getsource(m) for m in (json, textwrap, shutil)]
    tokenizer_path = tmp / "tokenizer.model"
    train_tokenizer(text, VOCAB).save(tokenizer_path)
    batches = awq.calibration_batches(cfg)
    out = tmp / "int4"
    manifest = export_bundle(model, cfg, str(tokenizer_path), out, bits=4, calib_batches=batches)
    return cfg, model, batches, tokenizer_path, out, manifest


def test_export_then_load_gives_the_logits_of_dequantising_in_memory_bit_exact(exported):
    cfg, model, batches, tokenizer_path, out, manifest = exported
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "manifest.json", "tokenizer.model", "weights"]
    assert not list(out.parent.glob(".int4.tmp-*"))  # the temporary directory was renamed into place
    assert (manifest["method"], manifest["bits"], manifest["group"]) == ("awq", 4, 32)
    assert manifest["bytes"]["quantized"] < manifest["bytes"]["float"]
    assert json.loads((out / MANIFEST).read_text()) == manifest

    bundle = load_bundle(out)
    assert isinstance(bundle, Bundle) and bundle.manifest == manifest
    assert bundle.cfg.model == awq.serving_config(cfg).model and bundle.cfg.serve == cfg.serve
    assert bundle.kv == {"kv_bits": 4, "kv_group": cfg.serve.kv_group, "snapkv_keep": cfg.serve.snapkv_keep,
                         "snapkv_window": cfg.serve.snapkv_window, "snapkv_kernel": cfg.serve.snapkv_kernel}
    text = "def f(x):\n    return x  # ok"
    assert bundle.tokenizer.decode(bundle.tokenizer.encode(text)) == text
    assert bundle.tokenizer.proto == tokenizer_path.read_bytes()
    assert bundle.model.pkm[0].slot_values is None and bundle.model.pkm[0].slot_values_int8[...].dtype == jnp.int8

    tree, _ = awq.quantize_model(model, cfg, batches, 4)
    in_memory = awq.empty_trunk(cfg.model)
    awq.dequantize_into(in_memory, tree)
    loaded = _logits(bundle.model, batches[0])
    np.testing.assert_array_equal(loaded, _logits(in_memory, batches[0]))
    float_logits = _logits(model, batches[0])
    assert 0 < np.abs(loaded - float_logits).mean() < 0.1 * np.abs(float_logits).mean()


def test_bundle_bytes_on_disk_int4_below_int8_below_float(exported, tmp_path):
    cfg, model, batches, _, int4, manifest = exported
    int8 = export_bundle(model, cfg, None, tmp_path / "int8", bits=8, calib_batches=None, method="rtn")
    full = export_bundle(model, cfg, None, tmp_path / "float", bits=None, calib_batches=None)
    disk = {"int4": _disk_bytes(int4 / "weights"), "int8": _disk_bytes(tmp_path / "int8" / "weights"),
            "float": _disk_bytes(tmp_path / "float" / "weights")}
    assert disk["int4"] < disk["int8"] < disk["float"], disk
    in_memory = [m["bytes"]["quantized"] for m in (manifest, int8, full)]
    assert in_memory[0] < in_memory[1] < in_memory[2] == full["bytes"]["float"]
    served = load_bundle(tmp_path / "float")
    assert full["method"] == "float" and served.tokenizer is None
    np.testing.assert_array_equal(_logits(served.model, batches[0]), _logits(model, batches[0]))


def test_directories_that_are_not_complete_bundles_fail_with_one_clear_line(exported, tmp_path):
    cfg, model, _, _, out, _ = exported
    with pytest.raises(BundleError, match="not a serving bundle"):
        load_bundle(tmp_path / "nowhere")
    with pytest.raises(BundleError, match="not a serving bundle"):
        load_bundle(tmp_path)
    with pytest.raises(BundleError, match="already exists"):
        export_bundle(model, cfg, None, out, bits=8, calib_batches=None, method="rtn")
    for broken, damage in (("no_weights", lambda d: shutil.rmtree(d / "weights")),
                           ("no_tokenizer", lambda d: (d / "tokenizer.model").unlink()),
                           ("bad_manifest", lambda d: (d / MANIFEST).write_text("{not json")),
                           ("old_format", lambda d: (d / MANIFEST).write_text(json.dumps({"format": "other/0"}))),
                           ("bad_weights", lambda d: [f.write_bytes(b"junk") for f in (d / "weights").rglob("*")
                                                      if f.is_file()])):
        copy = tmp_path / broken
        shutil.copytree(out, copy)
        damage(copy)
        with pytest.raises(BundleError) as info:
            load_bundle(copy)
        message = str(info.value)
        assert "\n" not in message and str(copy) in message and "export" in message  # names the fix


def test_a_latent_reasoner_bundle_keeps_its_projection_and_heads_and_quantises_its_trunk(exported, tmp_path):
    cfg, _, batches, _, _, _ = exported

    def build(hidden):
        return _random_fill(nnx.eval_shape(lambda: LatentReasoner(cfg.model, hidden, heads=3, rngs=nnx.Rngs(0))), 1)

    def outside_trunk(m):
        return {k: v for k, v in nnx.to_pure_dict(nnx.state(m, nnx.Param)).items() if k != "trunk"}

    model = build(cfg.latent.projection_hidden)
    manifest = export_bundle(model, cfg, None, tmp_path / "latent", bits=8, calib_batches=None, method="rtn")
    assert manifest["model"] == {"kind": "latent", "heads": 3}
    loaded = load_bundle(tmp_path / "latent").model
    assert isinstance(loaded, LatentReasoner) and loaded.budget.k_max == 3
    jax.tree.map(np.testing.assert_array_equal, outside_trunk(loaded), outside_trunk(model))
    tree, _ = awq.quantize_model(model.trunk, cfg, None, 8, method="rtn")
    in_memory = awq.empty_trunk(cfg.model)
    awq.dequantize_into(in_memory, tree)
    np.testing.assert_array_equal(_logits(loaded.trunk, batches[0]), _logits(in_memory, batches[0]))
    with pytest.raises(ConfigError, match="shapes"):  # built with another projection width than the config says
        export_bundle(build(24), cfg, None, tmp_path / "other", bits=8, calib_batches=None, method="rtn")
    assert not (tmp_path / "other").exists()


def test_a_routed_model_keeps_its_adapters_unmerged_and_loads_back_with_them_and_its_router(tmp_path):
    """The stage plan's exported model (workspace, router, adapters, PKM, episodic read), micro: the
    router gates the adapters per token, so the bundle keeps the bank in float and the served Trunk
    has the adapters and the router, computing the float model's logits up to the weights' rounding."""
    cfg = micro_config(f"model.vocab_size={VOCAB}", *PKM, "model.adapters=[general,math]", "model.workspace=true",
                       "model.router=true", "model.ws_layer=1", "model.ws_read_layers=[1]", "model.ws_chunk=8",
                       "model.episodic=true", "model.episodic_layer=1",
                       "serve.awq_group=32", "serve.awq_grid=4", "serve.awq_calib_batches=1")
    model = _random_fill(awq.empty_trunk(cfg.model), 2)
    batches = awq.calibration_batches(cfg)
    expected = _logits(model, batches[0])

    def params(m, part=lambda m: m):
        return nnx.to_pure_dict(nnx.state(part(m), nnx.Param))

    def bank(m):
        return [params(block.adapters) for block in m.blocks]

    for method, bits in (("awq", 8), ("rtn", 8), ("float", None)):
        manifest = export_bundle(model, cfg, None, tmp_path / method, bits=bits, method=method,
                                 calib_batches=batches if method == "awq" else None)
        assert manifest["adapters"] == {"names": ["general", "math"], "merged": False,
                                        "bytes": awq.weight_bytes(bank(model))}
        served = load_bundle(tmp_path / method)
        assert served.cfg.model == cfg.model and served.model.router is not None
        assert all(block.adapters.names == ("general", "math") for block in served.model.blocks)
        if method == "float":  # the float bundle is the model itself (so are its logits)
            jax.tree.map(np.testing.assert_array_equal, params(served.model), params(model))
            continue
        if method == "rtn":  # no scales to fold: the bank comes back as it was, unrounded
            jax.tree.map(np.testing.assert_array_equal, bank(served.model), bank(model))
        else:  # AWQ's scales are folded into the LoRA factors: rescaled, still float
            assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(bank(served.model)))
        loaded = _logits(served.model, batches[0])
        assert 0 < np.abs(loaded - expected).mean() < 0.02 * np.abs(expected).mean(), method
    with pytest.raises(ConfigError, match="unmerged"):  # a routed model's adapters cannot be fixed to one
        export_bundle(model, cfg, None, tmp_path / "math", bits=8, calib_batches=None, method="rtn", adapter="math")
    assert not (tmp_path / "math").exists()
