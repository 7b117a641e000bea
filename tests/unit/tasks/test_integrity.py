"""Output integrity: what a finished stage directory records about its files, and what a cache hit checks."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import pytest

from ftflow.artifacts import check_outputs, move_aside, record_outputs, write_json
from tasks._locks import LeasedFileLockManager
from tasks._stage import hash_all_from_env, lock_key, remove_dead_temporaries, verified_outputs

KEY = "0123456789abcdef0123"
OTHER = "fedcba9876543210fedc"
ABC_SHA256 = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def finished(directory: Path, hash_max_bytes: int = 64 * 2**20, hash_all: bool = False) -> dict:
    """A finished stage directory as run_stage writes it: a small file, a 10-byte 'weights' file, a manifest."""
    (directory / "model").mkdir(parents=True)
    (directory / "history.json").write_bytes(b"abc")
    (directory / "model" / "weights.bin").write_bytes(bytes(range(10)))
    manifest = {"stage": "train", "key": KEY, "files": {"history": "history.json", "model": "model"},
                "outputs": record_outputs(directory, hash_all=hash_all, hash_max_bytes=hash_max_bytes)}
    write_json(directory / "manifest.json", manifest)
    return manifest


def test_outputs_record_sizes_and_hashes_of_small_files_only(tmp_path):
    manifest = finished(tmp_path / "d", hash_max_bytes=4)
    weights_sha = hashlib.sha256(bytes(range(10))).hexdigest()
    assert manifest["outputs"] == {"history.json": {"bytes": 3, "sha256": ABC_SHA256},
                                   "model/weights.bin": {"bytes": 10}}
    assert record_outputs(tmp_path / "d", hash_all=True, hash_max_bytes=4) == {
        "history.json": {"bytes": 3, "sha256": ABC_SHA256},
        "model/weights.bin": {"bytes": 10, "sha256": weights_sha}}


def test_an_intact_directory_passes(tmp_path):
    manifest = finished(tmp_path)
    assert check_outputs(tmp_path, {"stage": "train", "key": KEY}) == (manifest, None)


def test_a_truncated_manifest_fails(tmp_path):
    finished(tmp_path)
    path = tmp_path / "manifest.json"
    path.write_bytes(path.read_bytes()[:200])
    manifest, problem = check_outputs(tmp_path, {"stage": "train", "key": KEY})
    assert manifest is None
    assert problem.startswith(f"{path} is not valid JSON (200 bytes: ")


def test_a_truncated_weights_file_fails(tmp_path):
    finished(tmp_path)
    weights = tmp_path / "model" / "weights.bin"
    weights.write_bytes(bytes(range(5)))
    assert check_outputs(tmp_path) == (None, f"{weights} has 5 bytes, 10 were written")


def test_a_missing_listed_file_fails(tmp_path):
    finished(tmp_path)
    (tmp_path / "history.json").unlink()
    assert check_outputs(tmp_path) == (None, f"{tmp_path / 'history.json'} (listed as 'history') is missing")


def test_a_missing_recorded_file_fails(tmp_path):
    finished(tmp_path)
    (tmp_path / "model" / "weights.bin").unlink()
    assert check_outputs(tmp_path) == (None, f"{tmp_path / 'model' / 'weights.bin'} is missing")


def test_same_size_damage_is_caught_by_hash_where_files_are_small_or_when_asked(tmp_path):
    finished(tmp_path, hash_max_bytes=4, hash_all=True)  # FTFLOW_VERIFY=full at write time: every file hashed
    (tmp_path / "history.json").write_bytes(b"abd")
    assert check_outputs(tmp_path, hash_max_bytes=4) == (
        None, f"{tmp_path / 'history.json'} has the right size but not the content that was written (SHA-256 differs)")
    (tmp_path / "history.json").write_bytes(b"abc")
    weights = tmp_path / "model" / "weights.bin"
    weights.write_bytes(bytes(range(1, 11)))
    # Over the size limit a default check compares sizes only; a full check hashes it too.
    assert check_outputs(tmp_path, hash_max_bytes=4)[1] is None
    assert check_outputs(tmp_path, hash_max_bytes=4, hash_all=True)[1] == (
        f"{weights} has the right size but not the content that was written (SHA-256 differs)")


def test_a_manifest_of_another_key_or_without_a_record_fails(tmp_path):
    manifest = finished(tmp_path)
    assert check_outputs(tmp_path, {"key": OTHER})[1] == (
        f"{tmp_path / 'manifest.json'} says key={KEY!r}, expected {OTHER!r}")
    write_json(tmp_path / "manifest.json", {k: v for k, v in manifest.items() if k != "outputs"})
    assert check_outputs(tmp_path)[1] == (
        f"{tmp_path / 'manifest.json'} has no record of its output files ('outputs': written by an older ftflow?)")
    (tmp_path / "manifest.json").unlink()
    assert check_outputs(tmp_path)[1] == f"{tmp_path / 'manifest.json'} is missing"


def test_a_damaged_directory_is_moved_aside_with_a_warning_and_kept(tmp_path, caplog):
    final = tmp_path / "train" / KEY
    finished(final)
    (final / "model" / "weights.bin").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="ftflow.tasks"):
        assert verified_outputs(final, "train", KEY) is None
    assert not final.exists()
    (kept,) = [p for p in (tmp_path / "train").iterdir()]
    assert kept.name.startswith(f".{KEY}.corrupt-") and (kept / "model" / "weights.bin").is_file()
    assert f"train: the outputs for key {KEY} failed verification: {final / 'model' / 'weights.bin'} has 0 bytes, " \
           f"10 were written; they were moved to {kept}" in caplog.text
    # An intact one is returned as it is.
    manifest = finished(final)
    assert verified_outputs(final, "train", KEY) == manifest


def test_moving_aside_twice_in_one_second_keeps_both(tmp_path):
    for _ in range(2):
        (tmp_path / KEY).mkdir()
        move_aside(tmp_path / KEY)
    assert len([p for p in tmp_path.iterdir() if p.name.startswith(f".{KEY}.corrupt-")]) == 2


def test_dead_runs_temporaries_are_removed_and_a_live_runs_are_kept(tmp_path):
    stage_dir = tmp_path / "train"
    live_partial = stage_dir / f".{KEY}.{'a' * 32}.partial"
    dead = [stage_dir / f".{OTHER}.{'b' * 32}.partial", stage_dir / f".{OTHER}.{'c' * 32}.old"]
    kept = [stage_dir / f".{OTHER}.work", stage_dir / f".{OTHER}.corrupt-20260101T000000Z", stage_dir / OTHER]
    for path in [live_partial, *dead, *kept]:
        path.mkdir(parents=True)
        (path / "file").write_text("x")
    locks = LeasedFileLockManager(tmp_path / ".locks", lease_seconds=30)
    live_run = LeasedFileLockManager(tmp_path / ".locks", lease_seconds=30)
    assert live_run.acquire_lock(lock_key("train", KEY), "live-run")
    try:
        assert remove_dead_temporaries(stage_dir, "train", None) == []  # no locks: nothing can be told apart
        assert remove_dead_temporaries(stage_dir, "train", locks) == sorted(dead)
        assert sorted(stage_dir.iterdir()) == sorted([live_partial, *kept])
        # The run that holds KEY's lock removes KEY's leftovers: no one else can be writing them.
        assert remove_dead_temporaries(stage_dir, "train", live_run, held_key=KEY) == [live_partial]
    finally:
        live_run.release_lock(lock_key("train", KEY), "live-run")
    assert sorted(stage_dir.iterdir()) == sorted(kept)


def test_verification_mode_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv("FTFLOW_VERIFY", raising=False)
    assert hash_all_from_env() is False
    monkeypatch.setenv("FTFLOW_VERIFY", "full")
    assert hash_all_from_env() is True
    monkeypatch.setenv("FTFLOW_VERIFY", "everything")
    with pytest.raises(ValueError, match="FTFLOW_VERIFY='everything' is not a verification mode; use one of "
                                         "small, full"):
        hash_all_from_env()


def test_outputs_an_older_ftflow_recorded_with_absolute_paths_are_reused_and_recorded_again(tmp_path, caplog):
    """Its manifest reads under the directory it is in now; its Prefect record (plain JSON, absolute paths) is
    dropped, so the run reuses the outputs and records them again with relative paths."""
    from tasks._stage import RECORD, ContentCache

    old_root, root = tmp_path / "old" / "artifacts", tmp_path / "moved" / "artifacts"
    final = root / "train" / KEY
    manifest = finished(final)
    write_json(final / "manifest.json", {**manifest, "dir": str(old_root / "train" / KEY),
                                         "base_model": {"path": str(old_root / "zoo" / "z" / "m")}})
    write_json(final / RECORD, {"metadata": {"serializer": {"type": "json"}}, "result": "{}"})
    found, problem = check_outputs(final, {"stage": "train", "key": KEY})
    assert problem is None
    assert found["dir"] == str(final) and found["base_model"]["path"] == str(root / "zoo" / "z" / "m")
    with caplog.at_level(logging.INFO, logger="ftflow.tasks"):
        ContentCache(stage="train")._verify(final, KEY)
    assert not (final / RECORD).exists() and (final / "manifest.json").exists()
    assert "written by an older ftflow (absolute paths); its outputs are reused and recorded again" in caplog.text
    # One whose own directory is not a <stage>/<key> of an artifacts directory cannot be read: computed again.
    write_json(final / "manifest.json", {**manifest, "dir": "/somewhere/else"})
    assert "older ftflow with absolute paths" in check_outputs(final, {"stage": "train", "key": KEY})[1]
