import pytest

from ftflow.artifacts import atomic_directory, read_manifest, relative_paths, sha256_tree, write_json


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


def test_a_stage_manifest_is_read_with_its_paths_under_the_directory_it_is_in_now(tmp_path):
    root = tmp_path / "artifacts"
    stage = root / "train" / "k1"
    stage.mkdir(parents=True)
    write_json(stage / "manifest.json", relative_paths({"dir": str(stage), "model": str(stage / "model")}, root))
    root.rename(tmp_path / "moved")
    moved = tmp_path / "moved" / "train" / "k1"
    assert read_manifest(moved) == {"dir": str(moved), "model": str(moved / "model")}


def test_tree_hash_sees_names_and_contents(tmp_path):
    (tmp_path / "a").write_text("1")
    first = sha256_tree(tmp_path)
    (tmp_path / "a").write_text("2")
    assert sha256_tree(tmp_path) != first


# -- paths relative to the artifacts directory -----------------------------------------------------------------

from pathlib import Path  # noqa: E402

from ftflow.artifacts import RELATIVE_PATHS, UnresolvablePaths, check_outputs, record_outputs, relative_paths  # noqa: E402
from ftflow.artifacts import resolved_paths  # noqa: E402


def _manifest(root: Path) -> dict:
    """A manifest as a run holds it: its own directory, a zoo checkpoint inside the artifacts, a hub id, a data file."""
    return {"stage": "train", "key": "k" * 20, "dir": str(root / "train" / ("k" * 20)),
            "job": {"model": {"path": str(root / "zoo" / "z" / "qwen2-teacher"), "name": "t"}},
            "models": [{"path": "Qwen/Qwen2.5-0.5B"}, {"path": str(root)}],
            "stats": {"train_file": "/data/train.txt", "note": f"see {root}/x"}, "files": {"model": "model"}}


def test_paths_inside_the_artifacts_directory_are_written_relative_and_read_back_under_another_one(tmp_path):
    written = relative_paths(_manifest(tmp_path / "a"), tmp_path / "a")
    assert written["dir"] == "train/" + "k" * 20
    assert written["job"]["model"]["path"] == "zoo/z/qwen2-teacher"
    assert written["models"] == [{"path": "Qwen/Qwen2.5-0.5B"}, {"path": "."}]
    # Paths outside it, and text that only mentions it, are left as they are.
    assert written["stats"] == {"train_file": "/data/train.txt", "note": f"see {tmp_path / 'a'}/x"}
    assert sorted(written[RELATIVE_PATHS]) == ["/dir", "/job/model/path", "/models/1/path"]
    assert str(tmp_path / "a") not in str({k: v for k, v in written.items() if k != "stats"})
    moved = resolved_paths(written, tmp_path / "b")
    assert moved == {**_manifest(tmp_path / "b"), "stats": written["stats"]}


def test_a_manifest_with_absolute_paths_is_read_under_the_directory_it_now_lives_in(tmp_path):
    old = _manifest(tmp_path / "old")  # as an older ftflow wrote it
    assert resolved_paths(old, tmp_path / "old") == old
    assert resolved_paths(old, tmp_path / "new") == {**_manifest(tmp_path / "new"), "stats": old["stats"]}
    with pytest.raises(UnresolvablePaths, match="older ftflow with absolute paths"):
        resolved_paths({**old, "dir": "/elsewhere/train/other-key"}, tmp_path / "new")


def test_check_outputs_returns_the_manifest_resolved_under_the_directory_it_checks(tmp_path):
    stage_dir = tmp_path / "a" / "train" / ("k" * 20)
    stage_dir.mkdir(parents=True)
    (stage_dir / "model").write_text("weights")
    manifest = {**_manifest(tmp_path / "a"), "outputs": record_outputs(stage_dir)}
    write_json(stage_dir / "manifest.json", relative_paths(manifest, tmp_path / "a"))
    (tmp_path / "a").rename(tmp_path / "b")
    found, problem = check_outputs(tmp_path / "b" / "train" / ("k" * 20), {"stage": "train"})
    assert problem is None
    assert found["dir"] == str(tmp_path / "b" / "train" / ("k" * 20))
    assert found["job"]["model"]["path"] == str(tmp_path / "b" / "zoo" / "z" / "qwen2-teacher")
