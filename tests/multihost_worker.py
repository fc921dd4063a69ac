"""One process of the multi-process training test (tests/test_multihost.py).

Joins the others through the same flags `train.py` takes (`--coordinator`, `--num-processes`,
`--process-id`), trains the given config, and writes what this process saw to `--result` as JSON:
its place among the processes, the global-batch rows it built, and the losses of its steps.
"""

from __future__ import annotations

import json
import sys

from quietreasoning import cli


@cli.one_line_errors
def main(argv=None) -> int:
    p = cli.parser("One process of the multi-process training test.", "tiny")
    p.add_argument("--result", required=True, help="JSON file this process writes")
    args = p.parse_args(argv)
    cfg = cli.load(args)  # joins the other processes before JAX touches a device

    import jax

    from quietreasoning.training import sharding
    from quietreasoning.training.input import local_rows
    from quietreasoning.training.trainer import train
    from quietreasoning.utils.io import atomic_write_text

    result = train(cfg, measure_roof=False, progress=False)
    rows = local_rows(sharding.batch_sharding(sharding.make_mesh(cfg)), cfg.train.global_batch, cfg.train.seq_len)
    atomic_write_text(args.result, json.dumps({
        "process_index": jax.process_index(), "process_count": jax.process_count(),
        "local_devices": jax.local_device_count(), "devices": jax.device_count(),
        "rows": rows.tolist(), "final_step": result.final_step,
        "losses": [h["loss"] for h in result.history]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
