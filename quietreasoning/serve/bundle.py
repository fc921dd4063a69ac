"""The serving bundle: one directory holding everything a server needs to rebuild the model.

    DIR/manifest.json     format, bits, group, method, KV settings, the adapters (merged or kept),
                          bytes (float and quantised, all weights and the block matmuls, and on
                          disk), the AWQ search report
    DIR/config.yaml       the resolved config of the served model (serve/awq.py `serving_config`:
                          adapters merged, model.adapters=[]; or, when model.router gates them,
                          kept with the router)
    DIR/weights/          an Orbax checkpoint of {"trunk": the trunk's parameter tree (serve/awq.py
                          `quantize_params`: int8 / int4 codes with scales and zeros for the block
                          matmuls, int8 PKM rows, the rest, an unmerged adapter bank included, in the
                          param dtype), and for a latent model
                          "latent": its thought projection and heads, in the param dtype}
    DIR/tokenizer.model   the SentencePiece model, when one was given

`export_bundle` writes the files into a temporary sibling directory and renames it to DIR at the
end, so a bundle is complete or absent; an existing DIR is never overwritten. The config is the
resolved Config written out whole as YAML and read back by `load_config` (base.yaml, then this file
as the preset), the same loader every run uses. `load_bundle` rebuilds the Trunk from that config,
restores the tree onto its abstract layout and dequantises it into the model (serve/awq.py: there
is no low-bit matmul kernel, weights rest quantised and compute runs on dequantised copies).

The model is a Trunk, or a LatentReasoner (model/latent.py: a trunk with a thought projection and,
for the stochastic loop, budget and verifier heads), rebuilt from cfg.latent.projection_hidden and
the manifest's `model.heads`; its trunk is quantised like a plain one. A float bundle (bits None)
stores the served model's float parameters unquantised: the reference a quantised bundle's size
and accuracy are compared with.

Adapters: without a router they are merged into the base weights with a fixed selection (the
manifest's "adapters": {"names", "merged": true, "select"}). When model.router gates them per token
the bundle keeps the bank unmerged, in float, and the served Trunk is rebuilt with the adapters and
the router, so it computes what the trained model computes up to the base matmuls' quantisation
("adapters": {"names", "merged": false, "bytes"}).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import orbax.checkpoint as ocp
import yaml
from flax import nnx

from quietreasoning.config import Config, ConfigError, DataError, load_config
from quietreasoning.model.latent import LatentReasoner
from quietreasoning.serve.awq import (adapter_report, dequantize_into, empty_trunk, matmul_bytes, merged_params,
                                      quantize_model, quantize_params, serving_config, weight_bytes)
from quietreasoning.utils import io
from quietreasoning.utils.tokenizer import Tokenizer, load_tokenizer

FORMAT = "quietreasoning-serving-bundle/1"
MANIFEST = "manifest.json"
CONFIG = "config.yaml"
WEIGHTS = "weights"
TOKENIZER = "tokenizer.model"
KV_KEYS = ("kv_bits", "kv_group", "snapkv_keep", "snapkv_window", "snapkv_kernel")


class BundleError(DataError):
    """A directory that is not a complete serving bundle, phrased as one line naming the path and the fix."""


@dataclasses.dataclass
class Bundle:
    model: nnx.Module           # the Trunk or LatentReasoner, weights dequantised into the param dtype
    cfg: Config                 # the served model's resolved config
    tokenizer: Tokenizer | None
    kv: dict[str, Any]          # serve.kv_bits, kv_group, snapkv_keep, snapkv_window, snapkv_kernel
    manifest: dict[str, Any]


def _disk_bytes(p) -> int:
    """Bytes of the files under directory `p` (local or cloud)."""
    def size(f) -> int:
        st = f.stat()  # os.stat_result from the local backend, etils' StatResult from gfile
        return st.st_size if hasattr(st, "st_size") else st.length
    return sum(size(root / name) for root, _, names in p.walk() for name in names)


def _empty_model(cfg: Config, kind: dict[str, Any]) -> nnx.Module:
    """The served model's shapes (nothing allocated) for the manifest's `model` entry."""
    if kind["kind"] == "trunk":
        return empty_trunk(cfg.model)
    return nnx.eval_shape(lambda: LatentReasoner(cfg.model, cfg.latent.projection_hidden, heads=kind["heads"],
                                                 rngs=nnx.Rngs(0)))


def _shapes(model: nnx.Module) -> dict:
    return jax.tree.map(lambda x: tuple(x.shape), nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def _latent_params(model: nnx.Module) -> dict:
    """A LatentReasoner's parameters outside its trunk (projection, heads) as a pure dict."""
    return {k: v for k, v in nnx.to_pure_dict(nnx.state(model, nnx.Param)).items() if k != "trunk"}


def export_bundle(model: nnx.Module, cfg: Config, tokenizer_path: str | None, out_dir: str | os.PathLike, *,
                  bits: int | None, calib_batches: Sequence[dict] | None, method: str = "awq",
                  adapter: str | Sequence[float] | None = None) -> dict[str, Any]:
    """Writes the bundle of `model` (a Trunk of `cfg.model`, or a LatentReasoner around one) to
    `out_dir` and returns its manifest.
    `bits` 8 or 4 quantises with `method` ("awq": calibrated on `calib_batches`, e.g.
    serve/awq.py `calibration_batches(cfg)`; "rtn"); None keeps the weights in float. `adapter`
    selects what the adapters are merged as (serve/awq.py `merged_params`; None: uniform mixture;
    with model.router on they stay unmerged and `adapter` must be None)."""
    out = io.path(out_dir)
    if out.exists():
        raise BundleError(f"{out_dir}: already exists; export to a new directory or delete it first "
                          "(a bundle is never overwritten)")
    tokenizer = None
    if tokenizer_path:
        tokenizer = load_tokenizer(str(tokenizer_path))
        tokenizer.check_fits(cfg.model.vocab_size, f"export_bundle tokenizer {tokenizer_path}")
    latent = isinstance(model, LatentReasoner)
    trunk = model.trunk if latent else model
    kind = {"kind": "latent" if latent else "trunk", "heads": model.budget.k_max if latent and model.budget else 0}
    if _shapes(model) != _shapes(_empty_model(cfg, kind)):  # what load_bundle rebuilds must hold these parameters
        raise ConfigError("export_bundle: the model's parameters do not have the shapes cfg.model (and "
                          "latent.projection_hidden) give; pass the config the model was built from, with its "
                          "float PKM tables (not yet quantize()d)")
    serving = serving_config(cfg)
    if bits is None:
        tree = merged_params(trunk, cfg, adapter)
        total, matmuls = weight_bytes(tree), matmul_bytes(tree)
        report = {"method": "float", "bits": None, "group": None, "adapters": adapter_report(cfg, tree, adapter),
                  "float_bytes": total, "quantized_bytes": total, "matmul_float_bytes": matmuls,
                  "matmul_quantized_bytes": matmuls}
    else:
        tree, report = quantize_model(trunk, cfg, calib_batches, bits, method=method, adapter=adapter)
    tree = {"trunk": tree}
    if latent:
        tree["latent"] = _latent_params(model)
        extra = weight_bytes(tree["latent"])
        report["float_bytes"] += extra
        report["quantized_bytes"] += extra

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():  # what an interrupted export of this process id left
        tmp.rmtree()
    tmp.mkdir(parents=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp / WEIGHTS, tree)
    checkpointer.wait_until_finished()
    checkpointer.close()
    resolved = json.loads(json.dumps(serving.to_dict()))  # tuples as lists, as YAML writes them
    io.atomic_write_text(tmp / CONFIG, "# the resolved config of a serving bundle (serve/bundle.py)\n"
                         + yaml.safe_dump(resolved, sort_keys=False))
    if tokenizer is not None:
        tokenizer.save(tmp / TOKENIZER)
    sizes = {name: report.pop(f"{name}_bytes") for name in ("float", "quantized", "matmul_float", "matmul_quantized")}
    manifest = {
        "format": FORMAT,
        **{k: report.pop(k) for k in ("method", "bits", "group", "adapters")},
        "kv": {k: getattr(cfg.serve, k) for k in KV_KEYS},
        "model": kind,
        "files": {"config": CONFIG, "weights": WEIGHTS, "tokenizer": TOKENIZER if tokenizer else None},
        "bytes": {**sizes, "disk": _disk_bytes(tmp)},  # disk: the bundle's files but this manifest
        "report": report,  # the rest of quantize_model's report: groups, the AWQ search
    }
    io.atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=1))
    tmp.rename(out)
    return manifest


def _read_manifest(p, where: str) -> dict[str, Any]:
    path = p / MANIFEST
    if not p.is_dir() or not path.exists():
        raise BundleError(f"{where}: not a serving bundle (no {MANIFEST}); export one with "
                          "quietreasoning.serve.bundle.export_bundle, or point at the bundle directory")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise BundleError(f"{path}: not valid JSON ({e}); re-export the bundle") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise BundleError(f"{path}: format {got!r} is not {FORMAT!r}; re-export the bundle with this version")
    return manifest


def load_bundle(path: str | os.PathLike) -> Bundle:
    """The bundle at `path`: the Trunk rebuilt from its config (with every module it has on: an
    unmerged adapter bank and its router included) with the stored weights dequantised into it,
    the config, the tokenizer (None when the bundle has none), KV settings and manifest."""
    p = io.path(path)
    manifest = _read_manifest(p, str(path))
    files = manifest["files"]
    for name in (files["config"], files["weights"], files["tokenizer"]):
        if name and not (p / name).exists():
            raise BundleError(f"{p / name}: missing from the bundle; re-export it (export_bundle)")
    cfg = load_config(str(p / files["config"]))
    model = _empty_model(cfg, manifest["model"])
    latent = isinstance(model, LatentReasoner)
    trunk = model.trunk if latent else model
    target = {"trunk": nnx.to_pure_dict(nnx.state(trunk, nnx.Param))}
    bits = manifest["bits"]
    if bits is not None:
        target["trunk"] = jax.eval_shape(lambda params: quantize_params(params, bits, manifest["group"]),
                                         target["trunk"])
    if latent:
        target["latent"] = _latent_params(model)
    checkpointer = ocp.StandardCheckpointer()
    try:
        tree = checkpointer.restore(p / files["weights"], target)
    except Exception as e:  # orbax raises many types; the user needs the path and the fix
        raise BundleError(f"{p / files['weights']}: cannot restore the weights ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200] if str(e) else ''}); re-export the bundle") from e
    finally:
        checkpointer.close()
    if bits is None:
        nnx.update(trunk, tree["trunk"])
    else:
        dequantize_into(trunk, tree["trunk"])
    if latent:
        nnx.update(model, tree["latent"])
    tokenizer = load_tokenizer(str(p / files["tokenizer"])) if files["tokenizer"] else None
    return Bundle(model, cfg, tokenizer, dict(manifest["kv"]), manifest)
