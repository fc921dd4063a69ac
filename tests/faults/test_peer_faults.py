"""A multi-process run whose peer never arrives: one error line within --distributed-timeout, exit
code 2, instead of a hang (cli.join_processes' watchdog)."""

import time

import pytest

from helpers import MICRO, free_port


@pytest.mark.parametrize("process_id", ["0", "1"])
def test_a_process_whose_peer_never_comes_says_so_in_one_line(run_cli, process_id):
    coordinator = f"127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    out = run_cli("train.py", "--coordinator", coordinator, "--num-processes", "2", "--process-id", process_id,
                  "--distributed-timeout", "5", *MICRO, timeout=60)
    assert time.monotonic() - t0 < 30
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr[-2000:]
    assert coordinator in lines[0] and "--distributed-timeout 5 s" in lines[0]
