import pytest

from ftflow.artifacts import atomic_directory, read_manifest, sha256_tree, write_json


def test_failed_block_leaves_nothing_behind(tmp_path):
    final = tmp_path / "stage" / "key"
    with pytest.raises(RuntimeError):
        with atomic_directory(final) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("crash")
    assert not final.exists()
    assert list((tmp_path / "stage").iterdir()) == []


def test_finished_directory_replaces_an_unfinished_leftover(tmp_path):
    final = tmp_path / "key"
    final.mkdir()
    (final / "stale.txt").write_text("old")
    assert read_manifest(final) is None
    with atomic_directory(final) as tmp:
        write_json(tmp / "manifest.json", {"ok": True})
    assert read_manifest(final) == {"ok": True}
    assert not (final / "stale.txt").exists()


def test_tree_hash_sees_names_and_contents(tmp_path):
    (tmp_path / "a").write_text("1")
    first = sha256_tree(tmp_path)
    (tmp_path / "a").write_text("2")
    assert sha256_tree(tmp_path) != first
