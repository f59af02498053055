"""Issue 6, crashes while a shard is written: a process killed between any two writes leaves no
marker that references a partial file, and the rerun writes exactly the clean run's bytes."""

from __future__ import annotations

import uuid

import pytest
from PIL import Image

from pipeline.storage import commit, layout
from pipeline.storage.store import Store
from tests.test_storage import CATEGORIES, FP, all_files, shard_inputs

FAILS = [("bad-1", "decode_error", "cannot decode image: truncated")]


class Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so nothing on the way catches it."""


def _store(name: str) -> Store:
    return Store.open(f"memory://crash-{name}-{uuid.uuid4().hex[:8]}")


def _write(store: Store) -> dict:
    return commit.write_shard(store, "00000-abc", shard_inputs(4), FAILS, CATEGORIES, FP)


def _deterministic(files: dict[str, bytes]) -> dict[str, bytes]:
    return {k: v for k, v in files.items() if "timings" not in k}


def _kill_after(store: Store, monkeypatch: pytest.MonkeyPatch, writes: int) -> None:
    """Make the filesystem die (as a killed process would) after ``writes`` file writes."""
    real, done = store.fs.pipe_file, [0]

    def pipe_file(path, value, *args, **kwargs):
        if done[0] == writes:
            raise Killed(path)
        done[0] += 1
        return real(path, value, *args, **kwargs)

    monkeypatch.setattr(store.fs, "pipe_file", pipe_file)


def test_a_kill_between_any_two_writes_never_commits_and_the_rerun_is_clean(monkeypatch):
    clean = _store("clean")
    _write(clean)
    expected = _deterministic(all_files(clean))
    n_files = len(all_files(clean))  # every file, the marker last among them
    for writes in range(n_files):
        store = _store(f"k{writes}")
        with monkeypatch.context() as m:
            _kill_after(store, m, writes)
            with pytest.raises(Killed):
                _write(store)
        assert not commit.is_committed(store, "00000-abc", FP), writes
        _write(store)  # the rerun
        assert _deterministic(all_files(store)) == expected, writes


def test_a_rerun_over_a_committed_shard_from_a_killed_rewrite_is_clean(monkeypatch):
    """Killed while redoing a committed shard (e.g. --overwrite): the old marker goes first, so
    the half-rewritten shard is not taken as done."""
    store = _store("redo")
    _write(store)
    with monkeypatch.context() as m:
        _kill_after(store, m, 2)
        with pytest.raises(Killed):
            _write(store)
    assert not commit.is_committed(store, "00000-abc", FP)


def test_a_torn_marker_at_any_length_is_not_a_commit():
    store = _store("torn")
    _write(store)
    rel = f"shards/00000-abc/{layout.MARKER}"
    whole = store.read(rel)
    assert commit.is_committed(store, "00000-abc", FP)
    for cut in range(len(whole)):
        store.write_many({rel: whole[:cut]})
        assert not commit.is_committed(store, "00000-abc", FP), cut


def test_verify_finds_a_file_that_no_longer_matches_its_marker():
    store = _store("swap")
    marker = _write(store)
    assert commit.verify_shard(store, "00000-abc") == []
    first = sorted(r for r in marker["files"] if r.startswith("labels/"))[0]
    store.write_many({first: b"\x89PNG partial"})
    store.remove_files(["shards/00000-abc/annotations.json"])
    problems = commit.verify_shard(store, "00000-abc")
    assert len(problems) == 2 and problems[0].startswith(f"{first}: 12 bytes, sha256")
    assert problems[1] == "shards/00000-abc/annotations.json: missing"


def test_an_actor_asked_again_for_a_committed_shard_does_not_commit_it_twice(tiny_config, tmp_path):
    """The runner retries a shard whose actor died; if it had committed just before dying, the
    retry must return the marker's counts and leave the shard alone."""
    from pipeline import manifest
    from pipeline.runner import _LabelActor
    from tests.conftest import CATEGORIES, blob_image

    Image.fromarray(blob_image(30, 40)).save(tmp_path / "a.png")
    shard = next(manifest.shards([{"id": "a", "uri": str(tmp_path / "a.png"), "tags": [1]}], 1))
    actor = _LabelActor(tiny_config, CATEGORIES, str(tmp_path / "out"), {})
    first = actor.label(shard, FP)
    marker = tmp_path / "out" / "shards" / shard.shard_id / layout.MARKER
    stamp = (marker.stat().st_mtime_ns, marker.read_bytes())
    assert actor.label(shard, FP) == first == {**first, "ok": 1}
    assert (marker.stat().st_mtime_ns, marker.read_bytes()) == stamp
    assert actor.label(shard, "e" * 64)["ok"] == 1  # another run's marker: labeled again
    assert marker.stat().st_mtime_ns != stamp[0]
