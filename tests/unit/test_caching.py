from pathlib import Path

from ftflow.caching import canonical, stage_key
from ftflow.config import DistillConfig

MODULES = ("ftflow.caching",)


def test_key_depends_on_config_values_not_on_object_identity():
    assert stage_key("s", {"d": DistillConfig()}, MODULES) == stage_key("s", {"d": DistillConfig()}, MODULES)
    assert stage_key("s", {"d": DistillConfig()}, MODULES) != stage_key("s", {"d": DistillConfig(alpha=0.1)}, MODULES)
    assert stage_key("s", {"x": 1}, MODULES) != stage_key("t", {"x": 1}, MODULES)


def test_files_count_by_content_not_by_name(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("same words\n")
    b.write_text("same words\n")
    assert stage_key("s", {"f": a}, MODULES) == stage_key("s", {"f": b}, MODULES)
    b.write_text("other words\n")
    assert stage_key("s", {"f": a}, MODULES) != stage_key("s", {"f": b}, MODULES)


def test_manifests_count_by_fingerprint_only():
    one = {"stage": "augment", "fingerprint": "abc", "seconds": 1.0, "dir": "/x"}
    two = {"stage": "augment", "fingerprint": "abc", "seconds": 9.0, "dir": "/y"}
    assert canonical(one) == canonical(two) == {"manifest": "augment", "fingerprint": "abc"}
    assert stage_key("s", {"m": one}, MODULES) == stage_key("s", {"m": two}, MODULES)
    assert stage_key("s", {"m": one}, MODULES) != stage_key("s", {"m": dict(one, fingerprint="abd")}, MODULES)


def test_code_of_the_stage_modules_is_in_the_key():
    assert stage_key("s", {}, ("ftflow.caching",)) != stage_key("s", {}, ("ftflow.caching", "ftflow.data"))


def test_unhashable_inputs_are_refused():
    import pytest

    with pytest.raises(TypeError, match="cannot make a cache key"):
        canonical(object())
    assert canonical(Path("/does/not/exist")) == "/does/not/exist"
