"""Test environment: 8 fake CPU devices, no hub, no wandb network, quiet TF.

Set before jax is imported anywhere, so every test sees the same 8 devices.
"""

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
# FAISS threads spin while waiting; on a shared 2-core machine that makes builds several times slower
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# one compilation cache per test session (children included): the many tests that build the same
# micro model compile each program once; a new session starts empty, so no stale entry survives a change
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _cache = tempfile.mkdtemp(prefix="qr-jax-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def run_cli(tmp_path):
    """Runs a repo CLI (`train.py`, `run.py`) in a subprocess; returns the CompletedProcess."""
    import subprocess

    def run(script: str, *args: str, timeout: int = 300, devices: int | None = None, background: bool = False):
        """`devices` fakes that many CPU devices in the child (default: the suite's 8); `background`
        returns the running Popen (output discarded) instead of waiting."""
        env = dict(os.environ, PYTHONPATH=str(REPO), WANDB_MODE="disabled")
        if devices is not None:
            env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
        command = [sys.executable, str(REPO / script), *args]
        if background:
            return subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
        return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    return run
