"""Serving: the compress_serve stage's export and what a server loads.

  awq.py     weight quantisation of the trunk's matmuls: activation-aware (AWQ) or round-to-nearest,
             int8 or int4 codes with per-(output channel, input group) scales; adapters merged first, or
             kept unmerged in float when the router gates them per token
  bundle.py  the serving bundle on disk (quantised weights via Orbax, resolved config, tokenizer, KV
             settings, manifest): `export_bundle` writes one atomically, `load_bundle` rebuilds the model
"""
