from pathlib import Path

import pytest
import yaml

from ftflow.config import ConfigError, load_config, parse_config
from flows.cli import parse_overrides

SIZE = {"hidden_size": 64, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 128}
ROOT = Path(__file__).resolve().parents[2]


def minimal(**extra) -> dict:
    raw = {"data": {"synthetic": {}}, "models": [{"name": "m", "path": "org/m", "family": "f"}]}
    raw.update(extra)
    return raw


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.artifacts_dir.is_absolute()
    assert (cfg.zoo is None) != (not cfg.models)


def test_demo_is_offline_and_seed_config_is_the_study():
    demo = load_config(ROOT / "configs" / "demo.yaml")
    assert demo.zoo is not None and {f.architecture for f in demo.zoo.families} == {"granite", "llama", "qwen2"}
    seed = load_config(ROOT / "configs" / "seed-20gb.yaml")
    assert seed.max_length == 2048 and seed.memory_budget_gb == 20
    assert seed.distill.teacher_batch_size == "auto"  # planned in the stage, as the benchmark's is
    by_name = {m.name: m for m in seed.models}
    assert by_name["granite-3.3-8b-base"].precision == "bf16"
    assert by_name["TinyLlama-1.1B-Chat-v1.0"].precision == "fp32"


def test_the_baselines_config_is_the_studys_section_2_and_every_model_plans_offline():
    from ftflow.models.known import known_architecture

    cfg = load_config(ROOT / "configs" / "seed-baselines.yaml")
    rows = [(m.path.split("/")[1], m.precision) for m in cfg.models]
    # Table 2.1, row by row (the report's "DeepSeek-1lm-7b-chat" is deepseek-llm-7b-chat).
    assert rows[:19] == [
        ("TinyLlama-1.1B-Chat-v1.0", "fp32"), ("TinyLlama-1.1B-Chat-v1.0", "bf16"), ("Qwen2.5-0.5B", "fp32"),
        ("Qwen2.5-0.5B", "bf16"), ("Qwen2.5-0.5B-Instruct", "fp16"), ("Qwen2.5-1.5B", "fp32"),
        ("Qwen2.5-1.5B-Instruct", "fp32"), ("Qwen2.5-7B-Instruct", "bf16"), ("Qwen2.5-7B-Instruct-1M", "bf16"),
        ("Qwen3-4B", "bf16"), ("DeepSeek-R1-Distill-Qwen-1.5B", "fp32"), ("DeepSeek-R1-Distill-Qwen-1.5B", "bf16"),
        ("deepseek-llm-7b-chat", "bf16"), ("Llama-3.2-1B-Instruct", "fp32"), ("Llama-3.2-3B-Instruct", "fp32"),
        ("granite-3.3-2b-base", "fp32"), ("granite-3.3-2b-instruct", "fp32"), ("granite-3.3-2b-instruct", "bf16"),
        ("granite-3.3-8b-base", "bf16")]
    # Table 2.2: every Granite version's 2b/8b base and instruct (3.2 has no base models).
    granite = {m.path.split("/")[1] for m in cfg.models if m.family == "granite"}
    assert granite == {f"granite-{v}-{size}-{kind}" for v in ("3.0", "3.1", "3.2", "3.3") for size in ("2b", "8b")
                       for kind in ("base", "instruct") if not (v == "3.2" and kind == "base")}
    assert [m.path for m in cfg.models if known_architecture(m.path) is None] == []


def test_all_problems_are_reported_at_once(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(minimal(seed="x", lora={"r": [8, 0], "colour": "red"})))
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert "3 problem(s)" in message
    assert "seed" in message and "lora.r.1" in message and "lora.colour" in message


def test_grid_axes_take_one_value_or_a_list_and_reject_repeats(tmp_path):
    cfg = parse_config(minimal(lora={"r": 16, "alpha": [16, 32]}, distill={"top_k": [10, 100]}), tmp_path)
    assert cfg.lora.r == (16,) and cfg.lora.alpha == (16.0, 32.0) and cfg.distill.top_k == (10, 100)
    with pytest.raises(ConfigError, match="lora.r: values repeat"):
        parse_config(minimal(lora={"r": [8, 8]}), tmp_path)
    with pytest.raises(ConfigError, match="prefix.num_virtual_tokens"):
        parse_config(minimal(prefix={"num_virtual_tokens": []}), tmp_path)


def test_ablation_needs_something_to_compare(tmp_path):
    with pytest.raises(ConfigError, match="augment.factor > 1"):
        parse_config(minimal(ablation={"enabled": True}, augment={"factor": 1.0}), tmp_path)
    # Augmentation off for the pipeline, on for the comparison only: allowed.
    cfg = parse_config(minimal(ablation={"enabled": True}, augment={"enabled": False}), tmp_path)
    assert cfg.ablation.enabled and not cfg.augment.enabled


def test_relative_paths_follow_the_config_file(tmp_path):
    raw = minimal(data={"train_file": "d/train.txt", "test_file": "/abs/test.txt"})
    cfg = parse_config(raw, tmp_path)
    assert cfg.data.train_file == tmp_path / "d" / "train.txt"
    assert cfg.data.test_file == Path("/abs/test.txt")
    assert cfg.artifacts_dir == (tmp_path / "artifacts").resolve()
    assert cfg.models[0].path == "org/m"  # a hub id is not a path


@pytest.mark.parametrize("raw, fragment", [
    (minimal(zoo={"families": [{"name": "g", "architecture": "granite", "student": SIZE, "teacher": SIZE}]}),
     "either zoo"),
    ({"data": {"synthetic": {}}}, "no candidate models"),
    (minimal(data={"train_file": "a.txt"}), "must both be set"),
    (minimal(models=[{"name": "m", "path": "a", "family": "f"}] * 2), "repeated"),
    (minimal(distill={"teacher_batch_size": 0}), "distill.teacher_batch_size.*must be >= 1 or 'auto'"),
])
def test_inconsistent_configs_are_refused(raw, fragment, tmp_path):
    with pytest.raises(ConfigError, match=fragment):
        parse_config(raw, tmp_path)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_cli_overrides_merge_into_nested_sections(tmp_path):
    overrides = parse_overrides(["distill.alpha=0.25", "lora.epochs=3", "name=x y"])
    assert overrides == {"distill": {"alpha": 0.25}, "lora": {"epochs": 3}, "name": "x y"}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(minimal(distill={"top_k": 5})))
    cfg = load_config(path, overrides)
    assert cfg.distill.alpha == (0.25,) and cfg.distill.top_k == (5,) and cfg.lora.epochs == 3
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_overrides(["distill.alpha"])


def test_every_path_the_config_names_is_checked_at_once(tmp_path):
    from ftflow.config import check_paths, path_problems

    (tmp_path / "test.txt").write_text("a sentence\n")
    (tmp_path / "notes.parquet").write_text("x")
    (tmp_path / "empty-dir").mkdir()
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    raw = minimal(
        data={"train_file": "train.txt", "test_file": "test.txt"},
        zoo=None,
        models=[{"name": "ok-dir", "path": str(model), "family": "f"},
                {"name": "ok-hub", "path": "ibm-granite/granite-3.3-8b-base", "family": "f"},
                {"name": "typo", "path": str(tmp_path / "modle"), "family": "f"},
                {"name": "no-config", "path": str(tmp_path / "empty-dir"), "family": "f"},
                {"name": "a-file", "path": str(tmp_path / "test.txt"), "family": "f"},
                {"name": "bad-id", "path": "org--x/name", "family": "f"}],
    )
    raw.pop("zoo")
    cfg = parse_config(raw, tmp_path)
    assert path_problems(cfg) == [
        f"data.train_file: data file {tmp_path / 'train.txt'} does not exist",
        f"models.2.path (typo): model directory {tmp_path / 'modle'} does not exist",
        f"models.3.path (no-config): {tmp_path / 'empty-dir'} is not a model directory: it has no config.json "
        "(a checkpoint written by save_pretrained has one)",
        f"models.4.path (a-file): model directory {tmp_path / 'test.txt'} is not a directory",
        "models.5.path (bad-id): 'org--x/name' is neither a model directory nor a well-formed hub id (org/name): "
        "Cannot have -- or .. in repo_id: 'org--x/name'.",
    ]
    with pytest.raises(ConfigError, match=r"^c.yaml has 5 problem\(s\):\n  - data.train_file: "):
        check_paths(cfg, "c.yaml")
    unknown = parse_config(minimal(data={"train_file": "notes.parquet", "test_file": "test.txt"}), tmp_path)
    assert path_problems(unknown) == [f"data.train_file: data file {tmp_path / 'notes.parquet'} has an unknown "
                                      "extension '.parquet'; use one of ['.csv', '.json', '.jsonl', '.text', '.txt']"]
    assert path_problems(parse_config(minimal(), tmp_path)) == []  # synthetic data, a hub id


def test_schema_and_path_problems_come_in_one_pass(tmp_path):
    """A bad zoo width and a missing data file: both in the first report, not the file after the widths."""
    from ftflow.config import load_checked_config

    (tmp_path / "test.txt").write_text("a sentence\n")
    raw = {"data": {"train_file": "nosuch.txt", "test_file": "test.txt"},
           "zoo": {"families": [{"name": "g", "architecture": "granite", "student": {**SIZE, "hidden_size": 65},
                                 "teacher": SIZE}]},
           "qlroa": {}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as error:
        load_checked_config(path)
    lines = str(error.value).splitlines()
    assert lines[0] == f"{path} has 3 problem(s):"
    assert lines[1].startswith("  - zoo: zoo.families[g].student: hidden_size 65 is not a multiple of 64")
    assert lines[2] == "  - qlroa: 'qlroa' is not a field of the config; did you mean 'qlora'?"
    assert lines[3] == f"  - data.train_file: data file {tmp_path / 'nosuch.txt'} does not exist"


def test_a_missing_corpus_file_is_said_beside_the_bad_widths_of_its_own_zoo_section(tmp_path):
    """Issue 25's example: the corpus file sits in the zoo section whose widths fail, and is still checked."""
    from ftflow.config import load_checked_config

    raw = {"data": {"synthetic": {}}, "zoo": {"corpus_file": "nosuch-corpus.txt", "families": [
        {"name": "g", "architecture": "granite", "student": {**SIZE, "hidden_size": 65}, "teacher": SIZE}]}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as error:
        load_checked_config(path)
    lines = str(error.value).splitlines()
    assert lines[0] == f"{path} has 2 problem(s):"
    assert lines[1].startswith("  - zoo: zoo.families[g].student: hidden_size 65 is not a multiple of 64")
    assert lines[2] == f"  - zoo.corpus_file: corpus file {tmp_path / 'nosuch-corpus.txt'} does not exist"


def test_problems_name_their_origin_as_the_user_wrote_it(tmp_path):
    from flows.cli import parse_overrides

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(minimal(lora={"learning_rate": -0.1, "epohcs": 2})))
    with pytest.raises(ConfigError) as error:
        load_config(path, parse_overrides(["nosuch.key=1", "prefix.learning_rate=[0.1, -1]"]))
    assert str(error.value).splitlines() == [
        f"{path} with --set nosuch.key=1 --set prefix.learning_rate=[0.1, -1] has 4 problem(s):",
        # One value where a grid axis takes a list is named as written, without "at least 1 item" after it.
        "  - lora.learning_rate: Input should be greater than 0",
        "  - lora.epohcs: 'epohcs' is not a field of section lora; did you mean 'epochs'?",
        "  - prefix.learning_rate.1 (from --set prefix.learning_rate=[0.1, -1]): Input should be greater than 0",
        "  - nosuch (from --set nosuch.key=1): 'nosuch' is not a field of the config (its fields: name, "
        "artifacts_dir, seed, device, max_length, memory_budget_gb, selection_split, data, augment, zoo, models, "
        "memory, benchmark, select, lora, qlora, prefix, finetune, distill, compare, ablation, training, search, "
            "runner)",
    ]


def test_a_directory_given_as_the_config_is_named_as_one(tmp_path):
    (tmp_path / "mine.yaml").write_text("{}")
    with pytest.raises(ConfigError, match=rf"^config {tmp_path} is a directory \(it holds mine.yaml\); pass the "
                                          "path of a YAML file in it$"):
        load_config(tmp_path)


def test_search_defaults_to_grid_and_the_seed_config_halves():
    assert parse_config(minimal(), Path(".")).search.model_dump() == {
        "strategy": "grid", "eta": 3, "rungs": (0.25, 0.5), "stratify": {"distill": ("temperature", "alpha")}}
    assert load_config(ROOT / "configs" / "demo.yaml").search.strategy == "grid"
    seed = load_config(ROOT / "configs" / "seed-20gb.yaml").search
    assert (seed.strategy, seed.eta, seed.rungs) == ("halving", 3, (0.25, 0.5))
    assert parse_config(minimal(search={"strategy": "halving", "rungs": 0.5}), Path(".")).search.rungs == (0.5,)
    search = parse_config(minimal(search={"stratify": {"lora": "learning_rate"}}), Path(".")).search
    assert search.stratify == {"lora": ("learning_rate",)}  # replaces the default: no distillation strata
    assert (search.axes("lora"), search.axes("distill"), search.axes("prefix")) == (("learning_rate",), (), ())


@pytest.mark.parametrize("search, fragment", [
    ({"eta": 1}, r"search: eta must be >= 2 \(1/eta of the combinations go on at each rung\), got 1"),
    ({"rungs": [0.5, 0.25]}, r"rungs must be strictly increasing, got \[0.5, 0.25\]"),
    ({"rungs": [0.5, 0.5]}, r"rungs must be strictly increasing"),
    ({"rungs": [0.25, 1.0]}, r"each in \(0, 1\) \(the end, 1.0, is always the last rung\); got \[1.0\]"),
    ({"rungs": [0.0]}, r"each in \(0, 1\)"),
    ({"rungs": []}, r"search.rungs"),
    ({"strategy": "random"}, r"search.strategy"),
    ({"stratify": {"distill": ["temprature"]}}, r"stratify.distill: 'temprature' is not an axis of the distill grid; "
                                                r"did you mean 'temperature'\? \(its axes: loss, top_k, temperature, "
                                                r"alpha\)"),
    ({"stratify": {"lora": ["top_k"]}}, r"stratify.lora: 'top_k' is not an axis of the lora grid \(its axes: r, "),
    ({"stratify": {"qlora": ["r"]}}, r"search.stratify.qlora"),
])
def test_bad_search_settings_are_clear_config_errors(search, fragment, tmp_path):
    with pytest.raises(ConfigError, match=fragment):
        parse_config(minimal(search={"strategy": "halving", **search}), tmp_path)
