"""The end-to-end entry point. Today it runs the tiny preset's real training on the CPU
(the synthetic language, no download) through the same code `train.py` uses, and says what
it did: the model, the data, the loss against the data's entropy, speed and checkpoints.

    python run.py                       # tiny preset, 300 steps, a few minutes on 2 cores
    python run.py train.steps=50        # any section.key=value override
"""

from __future__ import annotations

import sys

from quietreasoning import cli


@cli.one_line_errors
def main(argv=None) -> int:
    args = cli.parser("Run Quiet Reasoning end to end (tiny preset by default).", "tiny").parse_args(argv)
    cfg = cli.load(args)

    from quietreasoning.data.synthetic import SyntheticLanguage
    from quietreasoning.training.trainer import train

    data = SyntheticLanguage(cfg.model.vocab_size, cfg.data.synthetic_successors, cfg.train.seed)
    unigram, floor = data.unigram_entropy(), data.entropy_rate()
    print(f"Quiet Reasoning: training the '{args.config}' trunk on the synthetic language "
          f"(vocab {cfg.model.vocab_size}, unigram entropy {unigram:.2f} nats, floor {floor:.2f} nats)")
    r = train(cfg)
    if cli.said_nothing_to_train(r, cfg):
        return 0
    last = r.history[-1] if r.history else {}
    print(f"model: {r.n_params:,} parameters, {cfg.model.n_layers} layers, d_model {cfg.model.d_model}")
    print(f"steps: {r.start_step} -> {r.final_step} (start: {r.resumed_from}), "
          f"{cfg.train.global_batch} x {cfg.train.seq_len} tokens per step")
    print(f"loss: {r.final_loss:.3f} nats/token (unigram {unigram:.2f}, floor {floor:.2f})")
    if "tokens_per_s" in last:
        mfu = f", MFU {last['mfu']:.0%} of the measured {r.roof_flops / 1e9:.0f} GFLOP/s roof" if "mfu" in last else ""
        print(f"speed: {last['tokens_per_s']:,.0f} tokens/s{mfu}")
    print(f"checkpoints: {r.checkpoint_dir}; metrics: {cfg.run.out_dir}/{cfg.run.name}/metrics.jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(main())
