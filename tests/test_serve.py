"""The serving CLI: `python -m quietreasoning.serve generate` streams what the cached decoder returns,
reports the KV cache, runs think blocks from a latent bundle, and fails clearly without one."""

import inspect
import io
import json
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import micro_config

from quietreasoning.memory.kv_cache import KVSettings
from quietreasoning.model.latent import LatentReasoner
from quietreasoning.serve import awq
from quietreasoning.serve.__main__ import main
from quietreasoning.serve.bundle import export_bundle, load_bundle
from quietreasoning.training.inference import generate
from quietreasoning.utils.tokenizer import train_tokenizer

VOCAB = 384


def _random_fill(model, seed=0):
    rng = np.random.default_rng(seed)
    nnx.update(model, jax.tree.map(lambda x: jnp.asarray(rng.normal(0.0, 0.05, x.shape), x.dtype),
                                   nnx.to_pure_dict(nnx.state(model, nnx.Param))))
    return model


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    cfg = micro_config(f"model.vocab_size={VOCAB}", "serve.kv_bits=8", "serve.kv_group=8", "serve.snapkv_keep=1.0")
    tokenizer_path = tmp / "tokenizer.model"
    train_tokenizer([inspect.getsource(m) for m in (json, textwrap)], VOCAB).save(tokenizer_path)
    trunk = _random_fill(awq.empty_trunk(cfg.model))
    export_bundle(trunk, cfg, str(tokenizer_path), tmp / "trunk", bits=None, calib_batches=None)
    latent = _random_fill(nnx.eval_shape(lambda: LatentReasoner(cfg.model, rngs=nnx.Rngs(0))), 1)
    export_bundle(latent, cfg, str(tokenizer_path), tmp / "latent", bits=8, calib_batches=None, method="rtn")
    return tmp / "trunk", tmp / "latent"


def test_generate_streams_the_cached_decoders_answer_and_reports_the_kv_cache(bundles, capsys):
    trunk_dir, _ = bundles
    assert main(["generate", "--bundle", str(trunk_dir), "--prompt", "def dumps(obj", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out.split("\n")  # (a random model's text may hold other line breaks)
    bundle = load_bundle(trunk_dir)
    tok = bundle.tokenizer
    ids = [tok.bos_id] + tok.encode("def dumps(obj")
    new = generate(bundle.model, [ids], max_new_tokens=8, eos_id=tok.eos_id, kv=KVSettings(bits=8, group=8))[0]
    assert "\n".join(out[:-2]) == tok.decode(new)
    assert out[-2].startswith(f"[kv cache: {len(ids) + len(new)} slots for {len(ids) + len(new)} tokens")
    assert "int8 codes" in out[-2]


def test_interactive_answers_each_line_until_an_empty_one(bundles, capsys, monkeypatch):
    trunk_dir, _ = bundles
    monkeypatch.setattr("sys.stdin", io.StringIO("import json\nclass Wrapper\n\nnever read\n"))
    assert main(["generate", "--bundle", str(trunk_dir), "--interactive", "--max-new-tokens", "4",
                 "--kv-bits", "4"]) == 0
    reports = [line for line in capsys.readouterr().out.split("\n") if line.startswith("[kv cache:")]
    assert len(reports) == 2 and all("int4 codes" in r for r in reports)


def test_think_blocks_run_from_a_latent_bundle_and_a_plain_trunk_says_why_not(bundles, capsys):
    trunk_dir, latent_dir = bundles
    assert main(["generate", "--bundle", str(latent_dir), "--prompt", "x = 1", "--think", "2",
                 "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out.startswith("[2 thoughts]")
    assert main(["generate", "--bundle", str(trunk_dir), "--prompt", "x = 1", "--think", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --think") and "LatentReasoner" in err and len(err.strip().splitlines()) == 1
    assert main(["generate", "--bundle", str(trunk_dir.parent / "missing"), "--prompt", "x"]) == 2
