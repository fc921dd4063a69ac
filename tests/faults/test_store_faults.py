"""Episodic store faults: a save killed at a random moment, a disk that fills during a save, and a
saved file that is truncated, altered or missing. The previous version stays loadable; a damaged
file is one line naming it."""

import inspect
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from full_disk import fill_disk
from quietreasoning.config import DataError
from quietreasoning.memory.episodic import EpisodicStore
from test_episodic import DIM, keys_for, make, write_ids

REPO = Path(__file__).resolve().parents[2]
FILES = ("arrays.npz", "index.faiss", "sources.json")  # checked against store.json's sizes and sha256

WRITER = """
import sys
import numpy as np
from quietreasoning.memory.episodic import EpisodicStore
DIM = %d
%s
store = EpisodicStore.load(sys.argv[1])
while True:  # entry i has key keys_for([i]) and value (i, i); save after every write
    i = len(store)
    store.write(keys_for([i]), np.array([[i, i]], np.int32))
    store.save(sys.argv[1])
    print(i + 1, flush=True)
""" % (DIM, inspect.getsource(keys_for))


def test_a_save_killed_at_a_random_moment_leaves_a_consistent_store(tmp_path):
    path = tmp_path / "ep"
    store = make(capacity=100_000, clock=time.time)
    write_ids(store, np.arange(5000))  # about 1.5 MB per save, so a kill usually lands inside one
    store.save(path)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    rng = random.Random(0)
    interrupted = 0
    for attempt in range(12):  # until a kill has landed inside a save (timing varies with the machine's load)
        if attempt >= 3 and interrupted:
            break
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        first = writer.stdout.readline()  # one save completed
        assert first, writer.stderr.read()
        time.sleep(rng.uniform(0.0, 0.4))
        writer.send_signal(signal.SIGKILL)
        out, _ = writer.communicate()
        saved = int(([first] + out.split())[-1])  # the last save the writer finished
        leftovers = [p.name for p in path.iterdir() if p.name != "CURRENT" and p.name != (path / "CURRENT").read_text()]
        interrupted += bool(leftovers)
        loaded = EpisodicStore.load(path)
        n = len(loaded)
        assert n in (saved, saved + 1)  # a finished save is never lost; an unfinished one is all or nothing
        ids = np.concatenate([np.arange(n - 20, n), rng.sample(range(n), 30)])
        r = loaded.search(keys_for(ids), k=1)
        assert (r.values[:, 0, 0] == ids).all() and np.allclose(r.scores[:, 0], 1.0, atol=1e-5)
        assert loaded.index.ntotal == n
        assert loaded.search(keys_for([n]), k=1).scores[0, 0] < 0.9  # nothing beyond the saved entries
    assert interrupted  # at least one kill landed inside a save (a partial version was left behind)


@pytest.mark.parametrize("name, budget", [("arrays.npz", 4096), ("index.faiss", 100), ("sources.json", 3),
                                          ("store.json", 10), (".CURRENT.tmp-*", 3)])
def test_a_full_disk_during_a_save_names_the_file_and_keeps_the_previous_version(tmp_path, monkeypatch, name, budget):
    path = tmp_path / "ep"
    store = make()
    write_ids(store, np.arange(50))
    store.save(path)
    write_ids(store, np.arange(50, 80))
    fill_disk(monkeypatch, budget, names=name)  # that file stops after `budget` bytes
    with pytest.raises(DataError) as info:
        store.save(path)
    message = str(info.value)
    written = path / "CURRENT" if "CURRENT" in name else path / "v-000002" / name
    assert message.startswith(f"{written}: disk full (OSError: [Errno 28] No space left") and "\n" not in message
    assert "free space there" in message and "the previous version v-000001 is still current" in message
    assert sorted(p.name for p in path.iterdir()) == ["CURRENT", "v-000001"]  # the partial version is gone
    assert len(EpisodicStore.load(path)) == 50

    monkeypatch.undo()  # room again: the next save goes through
    store.save(path)
    loaded = EpisodicStore.load(path, clock=store.clock)
    assert len(loaded) == 80 and loaded.search(keys_for([79]), k=1).values[0, 0, 0] == 79


@pytest.mark.parametrize("name", [*FILES, "store.json"])
@pytest.mark.parametrize("damage", ["truncated", "altered", "missing"])
def test_a_damaged_file_is_named_on_load(tmp_path, name, damage):
    path = tmp_path / "ep"
    store = make("hnsw")
    write_ids(store, np.arange(40))
    store.save(path)
    target = path / "v-000001" / name
    data = target.read_bytes()
    if damage == "truncated":
        target.write_bytes(data[:len(data) // 2])
    elif damage == "altered":  # same size, one byte changed: only the sha256 tells (store.json: a wrong setting)
        data = data.replace(b'"top_k": 4', b'"top_k": 0') if name == "store.json" else data[:-1] + bytes([data[-1] ^ 1])
        target.write_bytes(data)
    else:
        target.unlink()
    with pytest.raises(DataError) as info:
        EpisodicStore.load(path)
    message = str(info.value)
    assert message.startswith(f"{target}: ") and "\n" not in message, message
    assert "restore the store from a copy, or build it again and save it" in message
    expected = {"truncated": "bytes but store.json lists", "altered": "differ from the sha256 in store.json",
                "missing": "missing from the saved episodic store"}[damage]
    if name == "store.json":  # the file that holds the checks: it must parse and hold valid settings
        expected = "unreadable episodic store file"
    assert expected in message


def test_garbage_in_place_of_a_file_is_named_and_a_store_saved_without_checksums_still_loads(tmp_path):
    path = tmp_path / "ep"
    store = make()
    write_ids(store, [1])
    store.save(path)
    meta_path = path / "v-000001" / "store.json"
    meta = json.loads(meta_path.read_text())
    del meta["files"]  # as saved before the checks existed
    meta_path.write_text(json.dumps(meta))
    assert len(EpisodicStore.load(path)) == 1
    arrays = path / "v-000001" / "arrays.npz"
    arrays.write_bytes(b"not a zip")  # without the checks, the parse still fails cleanly
    with pytest.raises(DataError, match=f"^{arrays}: unreadable episodic store file \\("):
        EpisodicStore.load(path)
