"""The idea-bottleneck stack: a second model family on the project's trunk. An encoder trunk
(bidirectional) is pooled and compressed into one idea vector z; a latent core maps it; an
expansion MLP turns it into soft-prompt embeddings from which a decoder trunk writes the target.

  config.py    StackConfig (bare key=value keys) and the trunks' project config (dotted keys)
  data.py      Example; the embedded tasks (summary, qa, addition), SAMSum / CNN-DailyMail files;
               tokenizer, padded arrays, the batch order
  model.py     IdeaStack: encode -> z_in, prefix(z_in), decode_logits, generate
  train.py     setup (freezing, optimizer, jitted step), train, load_run
  evaluate.py  ROUGE / exact match against lead-N and prior baselines; neighbours, interpolation, PCA
  __main__.py  python -m quietreasoning.stack train | eval | interpolate
"""
