"""The serving CLI: export a trained checkpoint as a serving bundle (serve/bundle.py), and generate
from a bundle with the KV cache it was exported with.

    python -m quietreasoning.serve export --checkpoint runs/tiny/checkpoints --tokenizer data/tiny/tokenizer.model \
        --output artifacts/bundle [--config tiny key=value ...] [--bits 4|8|float] [--method awq|rtn]
    python -m quietreasoning.serve generate --bundle DIR --prompt "Q: ..." [--max-new-tokens 64]
    python -m quietreasoning.serve generate --bundle DIR --interactive          # a prompt loop
    python -m quietreasoning.serve generate --bundle DIR --prompt "..." --think 4   # a latent bundle

Tokens stream to stdout as they are decoded (training/inference.py, KV-cached). The KV settings
come from the bundle's manifest (serve.kv_bits, snapkv_keep, ...) unless --kv-bits / --snapkv-keep
override them; after each answer one line reports the cache: slots held, bytes, and what an
unquantised cache of the same tokens would take. `--think K` runs a think block of K latent steps
where the prompt ends with <bot> (appended when it does not), and wherever the model emits <bot>
(model/latent.py generate); the output marks each block as [K thoughts]. It needs a bundle
exported from a LatentReasoner (it carries the thought projection).
"""

from __future__ import annotations

import sys

from quietreasoning import cli
from quietreasoning.config import ConfigError

THOUGHT_MARK = "[{k} thoughts]"


def _kv_settings(bundle, args):
    from quietreasoning.memory.kv_cache import KVSettings

    kv = dict(bundle.kv)
    if args.kv_bits is not None:
        kv["kv_bits"] = args.kv_bits
    if args.snapkv_keep is not None:
        kv["snapkv_keep"] = args.snapkv_keep
    return KVSettings(bits=kv["kv_bits"], group=kv["kv_group"], keep=kv["snapkv_keep"], window=kv["snapkv_window"],
                      kernel=kv["snapkv_kernel"])


def _describe(kv) -> str:
    parts = ["unquantised" if kv.bits == 16 else f"int{kv.bits} codes"]
    if kv.snapkv:
        parts.append(f"SnapKV keep {kv.keep:g} (window {kv.window})")
    return ", ".join(parts)


def answer(bundle, prompt: str, args, out=None) -> str:
    """Decodes one prompt, streaming the text to `out` (None: stdout); returns the new text."""
    from quietreasoning.memory.kv_cache import KVSettings, store_bytes_per_token
    from quietreasoning.model.latent import LatentReasoner, ModeController
    from quietreasoning.model.latent import generate as think_generate
    from quietreasoning.training.inference import decode

    out = out or sys.stdout
    tok, cfg = bundle.tokenizer, bundle.cfg.model
    ids = [tok.bos_id] + tok.encode(prompt) if tok.bos_id >= 0 else tok.encode(prompt)
    if args.think is not None:
        if not isinstance(bundle.model, LatentReasoner):
            raise ConfigError(f"--think: the bundle {args.bundle} holds a plain trunk without a thought projection; "
                              "export a LatentReasoner (training/latent.py) to serve think blocks, or drop --think")
        if ids[-1] != tok.bot_id:
            ids.append(tok.bot_id)
        controller = ModeController(tok.bot_id, tok.eot_id, args.think)
        new = think_generate(bundle.model, controller, [ids], max_new_tokens=args.max_new_tokens, eos_id=tok.eos_id,
                             k=args.think, temperature=args.temperature, seed=args.seed)[0]
        pieces, run = [THOUGHT_MARK.format(k=args.think)], []  # the prompt's own block ran first
        for t in new:
            if t in (tok.bot_id, tok.eot_id):
                pieces.append(tok.decode(run))
                run = []
                if t == tok.bot_id:
                    pieces.append(THOUGHT_MARK.format(k=args.think))
            else:
                run.append(t)
        pieces.append(tok.decode(run))
        text = "".join(pieces)
        print(text, file=out, flush=True)
        return text

    kv = _kv_settings(bundle, args)
    shown: list[int] = []
    printed = [""]

    def on_token(step, picked, live):
        if live[0] and picked[0] != tok.eos_id:
            shown.append(int(picked[0]))
            text = tok.decode(shown)
            print(text[len(printed[0]):], end="", file=out, flush=True)
            printed[0] = text

    result = decode(bundle.model, [ids], max_new_tokens=args.max_new_tokens, eos_id=tok.eos_id,
                    temperature=args.temperature, top_p=args.top_p, seed=args.seed, kv=kv, on_token=on_token)
    print(file=out)
    full = store_bytes_per_token(cfg.n_layers, cfg.n_kv_heads, cfg.resolved_head_dim, KVSettings(), cfg.compute_dtype)
    tokens = len(ids) + len(result.new[0])
    print(f"[kv cache: {result.kv_slots[0]} slots for {tokens} tokens, {result.kv_bytes[0] / 1024:,.1f} KiB "
          f"({_describe(kv)}); unquantised and uncompressed: {full * tokens / 1024:,.1f} KiB]", file=out, flush=True)
    return tok.decode(result.new[0])


def export(args) -> int:
    from quietreasoning.config import load_config
    from quietreasoning.eval.popqa import load_model
    from quietreasoning.serve.awq import calibration_batches
    from quietreasoning.serve.bundle import export_bundle

    cfg = load_config(args.config, args.overrides)
    bits = None if args.bits == "float" else int(args.bits if args.bits else cfg.serve.awq_bits)
    model = load_model(cfg, args.checkpoint)
    calib = calibration_batches(cfg) if bits is not None and args.method == "awq" else None
    manifest = export_bundle(model, cfg, args.tokenizer, args.output, bits=bits, calib_batches=calib,
                             method=args.method)
    size = manifest["bytes"]
    print(f"wrote {args.output}: {manifest['method']} weights ({bits or 'float'} bits), "
          f"{size['quantized'] / 1e6:.2f} MB of weights ({size['float'] / 1e6:.2f} MB in float), "
          f"{size['disk'] / 1e6:.2f} MB on disk; KV cache: {manifest['kv']}")
    return 0


def main(argv=None) -> int:
    p = cli.ArgumentParser(prog="python -m quietreasoning.serve", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export", help="write a serving bundle from a training checkpoint")
    e.add_argument("--checkpoint", required=True, help="a run's checkpoint directory or one of its steps")
    e.add_argument("--output", required=True, help="the bundle directory to create (must not exist)")
    e.add_argument("--tokenizer", help="the SentencePiece model the run trained with (needed to generate from text)")
    e.add_argument("--config", default="tiny", help="the run's preset or YAML (default tiny)")
    e.add_argument("--bits", choices=("4", "8", "float"), help="weight bits (default serve.awq_bits)")
    e.add_argument("--method", choices=("awq", "rtn"), default="awq")
    e.add_argument("overrides", nargs="*", help="section.key=value, as the run had them")
    g = sub.add_parser("generate", help="decode from a serving bundle")
    g.add_argument("--bundle", required=True, help="a directory written by serve/bundle.py export_bundle")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the text to continue")
    src.add_argument("--interactive", action="store_true", help="read prompts from stdin until EOF or an empty line")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling cut (1 = off)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--kv-bits", type=int, choices=(16, 8, 4), help="override the bundle's serve.kv_bits")
    g.add_argument("--snapkv-keep", type=float, help="override the bundle's serve.snapkv_keep (1 = off)")
    g.add_argument("--think", type=int, help="K latent steps per think block (a LatentReasoner bundle)")
    args = p.parse_args(argv)

    from quietreasoning.serve.bundle import load_bundle

    try:
        if args.command == "export":
            return export(args)
        bundle = load_bundle(args.bundle)
        if bundle.tokenizer is None:
            raise ConfigError(f"{args.bundle}: the bundle has no tokenizer.model; export it with a tokenizer to "
                              "generate from text")
        if args.interactive:
            print("prompt (empty line or Ctrl-D to quit)", file=sys.stderr)
            for line in sys.stdin:
                if not line.strip():
                    break
                answer(bundle, line.rstrip("\n"), args)
        else:
            answer(bundle, args.prompt, args)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
