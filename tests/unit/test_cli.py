import csv
from pathlib import Path

from flows.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_plan_of_the_study_config_chooses_precisions_offline(tmp_path, capsys):
    assert main(["plan", str(ROOT / "configs" / "seed-20gb.yaml"), "--max-length", "128", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "plan.csv") as handle:
        chosen = {row["model"]: row["precision"] for row in csv.DictReader(handle) if row["chosen"] == "True"}
    assert chosen["granite-3.3-8b-base"] == "bf16" and chosen["Qwen2.5-7B"] == "bf16"
    assert chosen["granite-3.3-2b-base"] == "fp32" and chosen["TinyLlama-1.1B-Chat-v1.0"] == "fp32"
    assert (tmp_path / "plan.png").stat().st_size > 0 and (tmp_path / "plan.md").is_file()
    assert "budget 20 GB" in capsys.readouterr().out


def test_plan_of_a_zoo_config_says_what_to_do(capsys):
    assert main(["plan", str(ROOT / "configs" / "demo.yaml")]) == 2
    assert "models: list" in capsys.readouterr().err


def test_bad_config_exits_2_with_the_problem(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("data: {synthetic: {}}\nmodels: [{name: m, path: a, family: f}]\nseed: nope\n")
    assert main(["validate", str(path)]) == 2
    assert "seed" in capsys.readouterr().err
