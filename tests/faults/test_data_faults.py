"""Data faults: a corrupt record, a truncated or missing shard, a shard whose sha256 no longer
matches, a truncated or garbled manifest, a build stopped half-way, and a disk that fills while
shards or the manifest are written. Each is one line naming the file and the fix, or (with
data.skip_corrupt) a warning with the skipped records counted; nothing finished is lost."""

import re

import numpy as np
import pytest

from full_disk import fill_disk
from quietreasoning.config import DataError
from quietreasoning.data.__main__ import main as data_main
from quietreasoning.data.reader import ShardReader
from quietreasoning.data.shards import ShardWriter, read_manifest, verified_shards, verify, write_manifest
from test_shards import make_shards, reader


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


# --- the reader ----------------------------------------------------------------------------------

def test_shards_without_a_manifest_or_from_an_unfinished_build_are_refused(tmp_path):
    make_shards(tmp_path)
    m = read_manifest(tmp_path)
    write_manifest(tmp_path, dict(m, complete=False))
    with pytest.raises(DataError, match="did not finish"):
        reader(tmp_path)
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(DataError, match="no manifest.json"):
        reader(tmp_path)


def _corrupt(path, at):
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_corrupt_record_names_the_shard_and_record_or_is_skipped_and_counted(tmp_path):
    make_shards(tmp_path)
    shard = sorted(tmp_path.glob("prose-*.tfrecord"))[0]
    assert not verified_shards(tmp_path, read_manifest(tmp_path)) == {}
    _corrupt(shard, len(shard.read_bytes()) // 2)  # a payload byte in the middle record
    assert shard.name not in verified_shards(tmp_path, read_manifest(tmp_path))
    r = reader(tmp_path, rows=64)
    with pytest.raises(DataError) as info:
        r.next_batch()
    message = str(info.value)
    assert "\n" not in message and shard.name in message and "corrupt record" in message
    assert "data.skip_corrupt=true" in message
    logs = []
    r = reader(tmp_path, rows=64, skip_corrupt=True, log=logs.append)
    b = r.next_batch()
    assert r.corrupt_records > 0 and logs and shard.name in logs[0]
    assert b["inputs"].shape == (64, 31)


@pytest.mark.parametrize("sized", [True, False], ids=["manifest_with_sizes", "manifest_without_sizes"])
def test_a_truncated_shard_is_named_or_skipped_and_counted(tmp_path, sized):
    """With the shard sizes in the manifest the reader refuses a truncated shard at start; an older
    manifest without them finds the cut while reading, as a corrupt record."""
    make_shards(tmp_path)
    m = read_manifest(tmp_path)
    if not sized:
        write_manifest(tmp_path, dict(m, shards=[{k: v for k, v in e.items() if k != "bytes"} for e in m["shards"]]))
    shard = sorted(tmp_path.glob("code-*.tfrecord"))[0]
    whole = len(shard.read_bytes())
    shard.write_bytes(shard.read_bytes()[:-9])
    with pytest.raises(DataError) as info:
        reader(tmp_path, rows=64).next_batch()
    message = str(info.value)
    assert message.startswith(f"{shard}: ") and "\n" not in message and "data.skip_corrupt=true" in message
    if sized:
        assert f"{whole - 9} bytes but its manifest.json lists {whole} (truncated" in message
    else:
        assert "corrupt record" in message
    logs = []
    r = reader(tmp_path, rows=64, skip_corrupt=True, log=logs.append)
    r.next_batch()
    records = next(e["records"] for e in m["shards"] if e["path"] == shard.name)
    assert logs and str(shard) in logs[0] and 0 < r.corrupt_records <= records
    if sized:  # skipped whole, at start
        assert r.corrupt_records == records and str(shard) not in r.files


def test_a_shard_listed_but_missing_is_named_or_skipped_and_counted(tmp_path):
    make_shards(tmp_path)
    gone = sorted(tmp_path.glob("prose-*.tfrecord"))[1]
    records = next(e["records"] for e in read_manifest(tmp_path)["shards"] if e["path"] == gone.name)
    gone.unlink()
    with pytest.raises(DataError) as info:
        reader(tmp_path)
    message = str(info.value)
    assert message.startswith(f"{gone}: listed in ") and "but missing" in message and "\n" not in message
    assert "rerun the build" in message and "data.skip_corrupt=true" in message
    ShardReader(str(tmp_path / "code-*.tfrecord"), seq_len=31, rows=4, seed=0)  # a pattern that does not select it
    logs = []
    r = reader(tmp_path, skip_corrupt=True, log=logs.append)
    assert r.corrupt_records == records and len(logs) == 1 and str(gone) in logs[0]
    assert r.next_batch()["inputs"].shape == (4, 31)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "null", "no_shard_list"])
def test_a_truncated_or_garbled_manifest_is_one_line_naming_it(tmp_path, capsys, damage):
    make_shards(tmp_path)
    manifest = tmp_path / "manifest.json"
    text = manifest.read_text()
    manifest.write_bytes({"truncated": text[:len(text) // 2].encode(), "garbage": b"\x00\xff\xfe binary",
                          "null": b"null", "no_shard_list": b'{"complete": true, "shards": 3}'}[damage])
    with pytest.raises(DataError) as info:
        reader(tmp_path)
    message = str(info.value)
    assert message.startswith(f"{manifest}: ") and "\n" not in message
    assert "copy it again, or delete it and rerun the build command" in message
    for command in ("inspect", "verify"):
        assert data_main([command, str(tmp_path)]) == 2
        assert one_line_error(capsys) == f"error: {message}"


# --- verify: sha256, sizes, missing and unlisted files ----------------------------------------------

def test_verify_names_the_first_shard_that_differs_from_the_manifest(tmp_path, capsys):
    make_shards(tmp_path)
    m = read_manifest(tmp_path)
    assert data_main(["verify", str(tmp_path)]) == 0
    assert f"{len(m['shards'])} shards, {m['records']:,} documents" in capsys.readouterr().out
    shard = tmp_path / m["shards"][2]["path"]
    original = shard.read_bytes()
    _corrupt(shard, 3)  # same size: only the sha256 tells
    assert data_main(["verify", str(tmp_path)]) == 2
    line = one_line_error(capsys)
    assert line.startswith(f"error: {shard}: sha256 differs") and "rerun the build command" in line
    shard.write_bytes(original[:-1])
    with pytest.raises(DataError, match=re.escape(f"{shard}: {len(original) - 1} bytes but manifest.json lists")):
        verify(tmp_path)
    shard.unlink()
    with pytest.raises(DataError, match=re.escape(f"{shard}: listed in manifest.json but missing")):
        verify(tmp_path)
    shard.write_bytes(original)
    (tmp_path / "stray-00000.tfrecord").write_bytes(b"")
    with pytest.raises(DataError, match="stray-00000.tfrecord: a shard file not listed in manifest.json"):
        verify(tmp_path)


# --- writing: an aborted writer, a full disk ----------------------------------------------------

def test_an_aborted_writer_leaves_no_partial_shard(tmp_path):
    w = ShardWriter(tmp_path, 100)
    w.add("prose", np.arange(5))
    w.abort()
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_while_writing_a_shard_names_it_and_a_rerun_completes_the_build(tmp_path, monkeypatch, capsys):
    out = tmp_path / "data"
    argv = ["build", "--output-dir", str(out), "--quiet", "--vocab-size", "512", "data.docs=120",
            "data.records_per_shard=8"]
    disk = fill_disk(monkeypatch, 60_000, names="*.tfrecord*")  # room for a few of its ~190 kB of shards
    assert data_main(argv) == 2
    line = one_line_error(capsys)
    failed = re.match(rf"error: {re.escape(str(out))}/(\w+-\d{{5}}\.tfrecord): disk full \(ResourceExhausted", line)
    assert failed and "rerun the same build command" in line and disk.failed
    assert not list(out.glob(".*tmp*"))  # nothing half-written is left
    m = read_manifest(out)
    assert not m["complete"] and m["shards"] and failed[1] not in {e["path"] for e in m["shards"]}
    assert not (out / failed[1]).exists()
    assert len(verified_shards(out, m)) == len(m["shards"])  # each finished shard intact
    finished = {e["path"]: (out / e["path"]).stat().st_mtime_ns for e in m["shards"]}

    monkeypatch.undo()  # room again
    assert data_main(argv) == 0
    again = verify(out)
    assert again["complete"] and len(again["shards"]) > len(m["shards"])
    assert all((out / p).stat().st_mtime_ns == t for p, t in finished.items())  # kept, not rewritten


def test_a_full_disk_while_writing_the_manifest_keeps_the_previous_one(tmp_path, monkeypatch):
    writer = ShardWriter(tmp_path, 5, on_shard=lambda shards: write_manifest(tmp_path, {"complete": False,
                                                                                           "shards": shards}))
    for i in range(5):
        writer.add("prose", np.arange(3 + i))
    before = (tmp_path / "manifest.json").read_text()
    fill_disk(monkeypatch, 50, names=".manifest.json.tmp-*")  # the next manifest stops after 50 bytes
    with pytest.raises(DataError) as info:
        for i in range(5):
            writer.add("prose", np.arange(3 + i))
    writer.abort()
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'manifest.json'}: disk full (OSError: [Errno 28]") and "\n" not in message
    assert "the previous manifest.json is kept" in message
    assert (tmp_path / "manifest.json").read_text() == before
    assert not list(tmp_path.glob(".*tmp*"))
    m = read_manifest(tmp_path)
    assert [e["path"] for e in m["shards"]] == ["prose-00000.tfrecord"] and len(verified_shards(tmp_path, m)) == 1
