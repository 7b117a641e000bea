"""`ftflow init`: a config for one's own data, every field at its documented default, validated."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from flows.cli import main
from ftflow.config import PipelineConfig, load_config
from ftflow.errors import UserError
from ftflow.study.init_config import _model_class, guess_family, write_config

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture()
def data(tmp_path) -> tuple[Path, Path]:
    train, test = tmp_path / "train.txt", tmp_path / "test.txt"
    train.write_text("".join(f"the film number {i} was good\n" for i in range(20)), encoding="utf-8")
    test.write_text("".join(f"the play number {i} was bad\n" for i in range(10)), encoding="utf-8")
    return train, test


def defaults(cls: type[BaseModel], prefix: str = "") -> dict[str, object]:
    """Every field of ``cls`` with a default, by dotted path, as JSON values; nested models walked."""
    out = {}
    for name, field in cls.model_fields.items():
        nested = _model_class(field.annotation)
        if field.is_required():
            continue
        default = field.get_default(call_default_factory=True)
        if nested is not None and isinstance(default, BaseModel):
            out.update(defaults(nested, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = default.model_dump(mode="json") if isinstance(default, BaseModel) else default
    return out


def flat(raw: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for key, value in raw.items():
        if isinstance(value, dict) and value and all(isinstance(k, str) for k in value) and key != "methods":
            out.update(flat(value, f"{prefix}{key}."))
        out[f"{prefix}{key}"] = value
    return out


def normalised(value):
    if isinstance(value, (tuple, list)):
        return [normalised(v) for v in value]
    if isinstance(value, dict):
        return {k: normalised(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


def test_every_field_is_written_at_its_documented_default(data, tmp_path):
    path, cfg, _ = write_config(tmp_path / "study", *data, ["demo"])
    raw = flat(yaml.safe_load(path.read_text(encoding="utf-8")))
    mine = {"data.train_file", "data.test_file", "zoo"}  # the user's, and the demo's zoo
    expected = {k: v for k, v in defaults(PipelineConfig).items() if not any(k == m or k.startswith(m + ".")
                                                                              for m in mine)}
    assert expected, "no defaults found"
    for key, value in expected.items():
        assert key in raw, f"{key} is not written"
        assert normalised(raw[key]) == normalised(value), key
    text = path.read_text(encoding="utf-8")
    # Each field's description is written above it.
    assert "# Distil only from a teacher that beats the student's own best" in text
    assert isinstance(cfg, PipelineConfig) and cfg == load_config(path)
    assert cfg.data.train_file == data[0].resolve() and cfg.artifacts_dir == (tmp_path / "study" / "artifacts")


def test_models_demo_seed_and_hub_ids_do_what_they_say(data, tmp_path):
    _, demo, _ = write_config(tmp_path / "demo", *data, ["demo"])
    assert demo.zoo == load_config(ROOT / "configs" / "demo.yaml").zoo and demo.models == ()
    _, seed, notes = write_config(tmp_path / "seed", *data, ["seed"], budget_gb=16)
    assert seed.models == load_config(ROOT / "configs" / "seed-20gb.yaml").models and seed.zoo is None
    assert seed.memory_budget_gb == 16 and "12 hub models" in notes[0]
    ids = ["Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-1.5B", "ibm-granite/granite-3.3-8b-base"]
    path, hub, notes = write_config(tmp_path / "hub", *data, ids)
    assert [(m.name, m.path, m.family, m.precision) for m in hub.models] == [
        ("Qwen2.5-0.5B", "Qwen/Qwen2.5-0.5B", "qwen2.5", "auto"), ("Qwen2.5-1.5B", "Qwen/Qwen2.5-1.5B", "qwen2.5", "auto"),
        ("granite-3.3-8b-base", "ibm-granite/granite-3.3-8b-base", "granite-3.3", "auto")]
    assert notes[0].startswith("families guessed from the names") and "qwen2.5: 2 model(s)" in notes[0]
    assert guess_family("TinyLlama/TinyLlama-1.1B-Chat-v1.0") == "tinyllama"
    assert guess_family("meta-llama/Llama-3.2-1B") == "llama-3.2" and guess_family("org/plain") == "plain"


def test_the_cli_prints_the_next_two_commands_and_refuses_bad_input_in_one_line(data, tmp_path, capsys):
    train, test = data
    assert main(["init", "--train", str(train), "--test", str(test), str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out.splitlines()
    config = tmp_path / "s" / "ftflow.yaml"
    assert out[0] == f"wrote {config}: every field at its documented default, validated"
    assert out[-3:] == ["next:", f"  1. ftflow status {config}", f"  2. ftflow run {config}"]
    assert main(["validate", str(config)]) == 0
    capsys.readouterr()
    # DIR after the hub ids (--models takes several values): still the directory.
    assert main(["init", "--train", str(train), "--test", str(test), "--models", "org/m-1b", "org/m-7b",
                 str(tmp_path / "h")]) == 0
    assert load_config(tmp_path / "h" / "ftflow.yaml").models[1].path == "org/m-7b"
    assert capsys.readouterr().out.splitlines()[-2] == f"  1. ftflow plan {tmp_path / 'h' / 'ftflow.yaml'}"
    cases = [
        (["--train", str(tmp_path / "missing.txt"), "--test", str(test), str(tmp_path / "a")],
         f"ftflow: --train {tmp_path / 'missing.txt'}: no such file"),
        (["--train", str(train), "--test", str(test), str(tmp_path / "s")],
         f"ftflow: {tmp_path / 's'} exists and is not an empty directory"),
        (["--train", str(train), "--test", str(test), "--models", "demo", "org/x", str(tmp_path / "b")],
         "ftflow: --models demo and --models seed stand alone"),
    ]
    for arguments, message in cases:
        assert main(["init", *arguments]) == 2
        err = capsys.readouterr().err
        assert err.startswith(message) and err.count("\n") == 1, err
    odd = tmp_path / "train.xlsx"
    odd.write_text("x\n", encoding="utf-8")
    assert main(["init", "--train", str(odd), "--test", str(test), str(tmp_path / "c")]) == 2
    assert "unknown extension '.xlsx'" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_too_few_sentences_are_refused_and_nothing_is_left(tmp_path):
    one, test = tmp_path / "one.txt", tmp_path / "test.txt"
    one.write_text("a single sentence\n", encoding="utf-8")
    test.write_text("a test sentence\n", encoding="utf-8")
    with pytest.raises(UserError, match="has 1 training sentence"):
        write_config(tmp_path / "x", one, test)
    assert not (tmp_path / "x").exists()


def test_the_configuration_reference_in_docs_is_current():
    from ftflow.study.init_config import CONFIGURATION_DOC, configuration_reference

    assert CONFIGURATION_DOC.read_text(encoding="utf-8") == configuration_reference() + "\n", (
        "docs/configuration.md is out of date: run `python scripts/config_reference.py`")
