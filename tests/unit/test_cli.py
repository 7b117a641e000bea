import csv
import os
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from flows.cli import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
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


def test_a_bad_yaml_value_in_set_is_one_clear_line(capsys):
    assert main(["run", "--set", "lora.r=[8"]) == 2
    err = capsys.readouterr().err
    assert err == ("ftflow: --set 'lora.r=[8': the value '[8' is not valid YAML (expected ',' or ']', but got "
                   "'<stream end>'); quote a string (--set 'name=\"my study\"') and close lists ([8, 16])\n")


def test_tracebacks_of_user_errors_only_with_debug():
    from ftflow.config import ConfigError

    for argv in (["--debug", "run", "--set", "lora.r=[8"], ["run", "--set", "lora.r=[8", "--debug"]):
        with pytest.raises(ConfigError, match="not valid YAML"):
            main(argv)


def test_internal_errors_keep_their_traceback(monkeypatch):
    from ftflow.plan import decide as plan_decide

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(plan_decide, "plan_model", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["plan", str(ROOT / "configs" / "seed-20gb.yaml")])


def _config(directory, name, **data):
    path = directory / name
    path.write_text(yaml.safe_dump({"data": data or {"synthetic": {}}, "models": [
        {"name": "m", "path": "org/m", "family": "f"}]}))
    return path


def test_validate_checks_the_paths_of_every_file_given(tmp_path, capsys):
    good = _config(tmp_path, "good.yaml")
    missing = _config(tmp_path, "missing.yaml", train_file="nope.txt", test_file="good.yaml")
    schema = tmp_path / "schema.yaml"
    schema.write_text("data: {synthetic: {}}\nmodels: [{name: m, path: a, family: f}]\nseed: nope\n")
    assert main(["validate", str(missing), str(schema), str(good)]) == 2
    captured = capsys.readouterr()
    assert captured.out == f"{good}: ok\n"
    assert captured.err.startswith(f"ftflow: {missing} has 2 problem(s):\n"
                                   f"  - data.train_file: data file {tmp_path / 'nope.txt'} does not exist\n"
                                   f"  - data.test_file: data file {tmp_path / 'good.yaml'} has an unknown extension")
    assert f"ftflow: {schema} has 1 problem(s):\n  - seed:" in captured.err
    assert captured.err.endswith("ftflow: 2 of 3 config(s) have problems\n")
    assert "Traceback" not in captured.err


def test_run_with_a_missing_train_file_stops_before_prefect_in_one_message(tmp_path, capsys):
    (tmp_path / "test.txt").write_text("a sentence\n")
    config = _config(tmp_path, "c.yaml", train_file="train.txt", test_file="test.txt")
    assert main(["run", str(config)]) == 2
    assert capsys.readouterr().err == (f"ftflow: {config} has 1 problem(s):\n"
                                       f"  - data.train_file: data file {tmp_path / 'train.txt'} does not exist\n")


def test_prefect_console_logs_show_user_errors_without_traceback():
    import logging
    import sys

    from flows.cli import _WithoutUserTracebacks
    from ftflow.data.splits import DataError

    formatter = _WithoutUserTracebacks(logging.Formatter("%(levelname)s %(message)s"))
    records = []
    for error in (DataError("data file x.txt, line 3: not valid JSON"), RuntimeError("a bug")):
        try:
            raise error
        except Exception:
            records.append(logging.LogRecord("prefect.task_runs", logging.ERROR, __file__, 1, "failed: %r",
                                             (error,), sys.exc_info()))
    user, internal = records
    assert formatter.format(user) == "ERROR failed: DataError('data file x.txt, line 3: not valid JSON')"
    assert user.exc_info is not None  # the UI's handler still gets the traceback
    text = formatter.format(internal)
    assert text.startswith("ERROR failed: RuntimeError('a bug')\nTraceback (most recent call last):")
    assert text.endswith("RuntimeError: a bug")


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache for this test (offline, as every test is), and no hub answers remembered."""
    from huggingface_hub import constants

    from ftflow.models import hub

    folder = tmp_path / "hf-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(folder))
    monkeypatch.setattr(hub, "_MEMO", {})
    return folder


def test_a_mistyped_hub_id_offline_stops_the_run_at_once_in_one_line(tmp_path, capsys, hf_cache):
    (tmp_path / "train.txt").write_text("a sentence\nanother sentence\n")
    (tmp_path / "test.txt").write_text("a sentence\n")
    config = tmp_path / "typo.yaml"
    config.write_text(yaml.safe_dump({"data": {"train_file": "train.txt", "test_file": "test.txt"},
                                      "augment": {"enabled": False}, "ablation": {"enabled": False},
                                      "models": [{"name": "qwen", "path": "Qwen/Qwen2.5-0.5BB", "family": "qwen"}]}))
    assert main(["validate", str(config)]) == 0  # offline, only the id's form can be checked
    capsys.readouterr()
    assert main(["run", str(config), "--no-progress"]) == 2
    assert capsys.readouterr().err == (
        "ftflow: no candidate model can be used, nothing was run: qwen: Qwen/Qwen2.5-0.5BB is not in the Hugging Face "
        f"cache ({hf_cache / 'models--Qwen--Qwen2.5-0.5BB'}: no config.json) and HF_HUB_OFFLINE is set: download it "
        "once with network access (`hf download Qwen/Qwen2.5-0.5BB`), or point HF_HUB_CACHE (or HF_HOME) at a cache "
        "that holds it, or unset HF_HUB_OFFLINE if this machine can reach the hub (did you mean Qwen/Qwen2.5-0.5B?)\n")
    assert not (tmp_path / "artifacts").exists()


def test_validate_online_asks_the_hub_about_every_hub_id(tmp_path, capsys, hf_cache, monkeypatch):
    from huggingface_hub import constants

    from tests.fake_hub import FakeHub, FakeModel

    config = _config(tmp_path, "c.yaml")
    raw = yaml.safe_load(config.read_text())
    raw["models"] = [{"name": "typo", "path": "Qwen/Qwen2.5-0.5BB", "family": "qwen"},
                     {"name": "gated", "path": "meta-llama/Llama-3.2-1B", "family": "llama"},
                     {"name": "fine", "path": "Qwen/Qwen2.5-0.5B", "family": "qwen"}]
    config.write_text(yaml.safe_dump(raw))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-saved-token"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with FakeHub({"Qwen/Qwen2.5-0.5B": FakeModel({"config.json": b"{}"}),
                  "meta-llama/Llama-3.2-1B": FakeModel({"config.json": b"{}"}, gated="manual")}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        assert main(["validate", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ftflow: {config} has 2 problem(s):\n"
                          f"  - models (typo): Qwen/Qwen2.5-0.5BB does not exist on the hub ({server.url}/Qwen/"
                          "Qwen2.5-0.5BB) (or it is private: put a token that can see it in HF_TOKEN): fix its "
                          "models[].path in the config (did you mean Qwen/Qwen2.5-0.5B?)\n"
                          "  - models (gated): meta-llama/Llama-3.2-1B is gated and no Hugging Face token is set: ")
    assert "fine" not in err


def _study_config(tmp_path, with_data: bool = True) -> Path:
    """configs/seed-20gb.yaml with its data in tmp_path: 180 training sentences of 9 words and 20 of 47 (sst2's
    longest: some in each split), 20 test sentences; without the files when ``with_data`` is False."""
    raw = yaml.safe_load((ROOT / "configs" / "seed-20gb.yaml").read_text())
    raw["data"] = {"train_file": "train.txt", "test_file": "test.txt", "validation_fraction": 0.1}
    raw["artifacts_dir"] = str(tmp_path / "artifacts")
    if with_data:
        nine = "the film is so bleak that it is hardly watchable"
        (tmp_path / "train.txt").write_text("\n".join([nine] * 180 + [" ".join(["word"] * 47)] * 20) + "\n")
        (tmp_path / "test.txt").write_text("\n".join([nine] * 20) + "\n")
    path = tmp_path / "seed.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_plan_shows_every_training_run_of_the_study_fitting_20_gb_with_its_hours_and_its_disk(tmp_path, capsys,
                                                                                               hf_cache):
    config = _study_config(tmp_path)
    assert main(["plan", str(config), "--out", str(tmp_path / "plan"), "--gpu", "a100"]) == 0
    out = capsys.readouterr().out
    with open(tmp_path / "plan" / "training_plan.csv") as handle:
        rows = {row["run"]: row for row in csv.DictReader(handle)}
    # The LoRA grid (24), per-model LoRA/QLoRA/full (32), prefix grid (8), distillation (top-k and sampled at
    # k = 10, 12, 100: 6; their equal-steps full fine-tune is the per-model one), ablation (5 more).
    assert len(rows) == 75 and all(row["fits"] == "True" for row in rows.values())
    assert "75 of 75 training runs fit 20 GB;" in out
    assert rows["distill[granite-3.3-2b-base|sample12,T1,a0.5,lr2e-05]"]["fits"] == "True" and "hours on one a100 (bf16 312 / fp32 19.5 TFLOP/s" in out
    lora = rows["lora[granite-3.3-8b-base|r16,a32,d0.05,lr0.0002]"]
    assert (lora["micro x accumulation"], lora["checkpointing"], lora["optimizer"]) == ("1 x 4", "False", "adamw")
    full = rows["full[granite-3.3-2b-base|lr2e-05]"]
    assert (full["micro x accumulation"], full["optimizer"], full["weights"]) == (
        "4 x 1", "adamw-8bit", "bf16 (adamw-8bit-stochastic-rounding)")
    assert "granite-3.3-8b-base lora: micro-batch 1 x 4 accumulation, checkpointing off, fp32 AdamW" in out
    assert "token counts estimated at 1.5 per word" in out
    # The disk: every model's download (offline: its parameters in bf16, as stored on the hub) into the cache.
    from ftflow.models.architecture import count_config_parameters, model_config_for

    ids = [m["path"] for m in yaml.safe_load(config.read_text())["models"]]
    downloads = sum(2 * count_config_parameters(model_config_for(i)) for i in ids)
    assert f"- downloads {downloads / 1e9:.1f} GB into {hf_cache} (HF_HUB_CACHE): TinyLlama/TinyLlama-1.1B-Chat-v1.0 2.2 GB " \
           "(1.10B parameters in bf16), " in out
    assert f"- kept outputs " in out and "- checkpoints in flight " in out and "\ndisk: " in out


def test_plan_without_the_data_says_so_and_plans_the_worst_case(tmp_path, capsys, hf_cache):
    assert main(["plan", str(_study_config(tmp_path, with_data=False)), "--out", str(tmp_path / "plan")]) == 0
    out = capsys.readouterr().out
    assert f"data file(s) absent: {tmp_path / 'train.txt'}, {tmp_path / 'test.txt'}; every run is planned at " \
           "max_length (2048 tokens, the worst case)" in out
    assert "training runs fit 20 GB" in out


def test_the_training_plan_is_computed_and_written_by_ftflow_not_the_cli(tmp_path, hf_cache):
    """What `ftflow plan` prints of the training runs comes from ftflow.plan.study, testable without stdout."""
    from ftflow.config import load_config
    from ftflow.plan.study import TRAINING_PLAN_FILES, plan_study, write_training_plan

    cfg = load_config(_study_config(tmp_path))
    study = plan_study(cfg, device="cuda", bf16_supported=True)
    text = write_training_plan(cfg, study, tmp_path, "a100", 0.3)
    with open(tmp_path / TRAINING_PLAN_FILES["csv"]) as handle:
        assert len(list(csv.DictReader(handle))) == len(study.runs) == 75
    assert (tmp_path / TRAINING_PLAN_FILES["markdown"]).read_text().rstrip("\n") in text
    assert "75 of 75 training runs fit 20 GB;" in text and "hours on one a100 (bf16 312 / fp32 19.5 TFLOP/s" in text


def test_plan_gives_the_studys_compute_under_grid_and_under_halving(tmp_path, hf_cache):
    """The seed study halves its LoRA grid (24 runs), prefix grid (8) and distillation variants (6): 9.5, 3.25
    and 2.5 whole runs of their own (rungs 1/4 and 1/2, eta 3); every other run trains once either way."""
    from ftflow.config import load_config
    from ftflow.plan.study import plan_study, search_compute, write_training_plan

    cfg = load_config(_study_config(tmp_path))
    study = plan_study(cfg, device="cuda", bf16_supported=True)
    sections = {}
    for run in study.runs:
        sections.setdefault(run.section, []).append(run.flops)
    assert {k: len(v) for k, v in sections.items() if k in ("3.1 LoRA grid", "3.2 prefix", "3.3 distillation")} == \
        {"3.1 LoRA grid": 24, "3.2 prefix": 8, "3.3 distillation": 6}
    share = {"3.1 LoRA grid": 9.5 / 24, "3.2 prefix": 3.25 / 8, "3.3 distillation": 2.5 / 6}
    totals = search_compute(cfg, study.runs, "a100", 0.3)
    assert totals["grid"]["flops"] == pytest.approx(sum(r.flops for r in study.runs))
    assert totals["halving"]["flops"] == pytest.approx(sum(sum(f) * share.get(k, 1.0) for k, f in sections.items()))
    assert 0.3 < totals["halving"]["flops"] / totals["grid"]["flops"] < 1.0
    text = write_training_plan(cfg, study, tmp_path, "a100", 0.3)
    ratio = totals["halving"]["flops"] / totals["grid"]["flops"]
    assert (f"search: grid {totals['grid']['flops'] / 1e18:.3f} EFLOP, {totals['grid']['hours']:.1f} hours; "
            f"successive halving (this config's strategy, eta 3, rungs 0.25, 0.5) "
            f"{totals['halving']['flops'] / 1e18:.3f} EFLOP") in text and f": {ratio:.2f} of grid" in text
    # Strata (search.stratify): the 6 variants by loss halve as two grids of 3, 2 x (3/4 + 1/4 + 1/2) = 3 runs.
    by_loss = load_config(_study_config(tmp_path), {"search": {"stratify": {"distill": ["loss"]}}})
    runs = plan_study(by_loss, device="cuda", bf16_supported=True).runs
    assert sorted({r.stratum for r in runs if r.section == "3.3 distillation"}) == [("sampled",), ("topk",)]
    assert {r.stratum for r in runs if r.section != "3.3 distillation"} == {()}
    assert search_compute(by_loss, runs, "a100", 0.3)["halving"]["flops"] == pytest.approx(
        totals["halving"]["flops"] + sum(sections["3.3 distillation"]) * (3.0 - 2.5) / 6)


def test_a_prefect_home_the_run_created_is_removed_with_what_its_client_wrote_there(tmp_path, monkeypatch):
    """A worker thread finishing an interrupted stage writes its result under Prefect's default storage after the
    temporary server's settings are restored: the home Prefect made during the run goes, contents and all."""
    from flows import cli

    home = tmp_path / "home" / ".prefect"
    monkeypatch.setenv("PREFECT_HOME", str(home))
    monkeypatch.setattr(cli._PrefectHome, "created", None)
    monkeypatch.delitem(sys.modules, "prefect", raising=False)  # as before the run's first Prefect import
    cli._PrefectHome.note()
    (home / "storage").mkdir(parents=True)
    (home / "storage" / "3f2a").write_text("a pickled result", encoding="utf-8")
    cli._PrefectHome.forget()
    assert not home.exists()
    # A home with a user's own files (a profile, a server's database) that appeared meanwhile stays.
    cli._PrefectHome.note()
    (home / "storage").mkdir(parents=True)
    (home / "profiles.toml").write_text("active = 'mine'", encoding="utf-8")
    cli._PrefectHome.forget()
    assert (home / "profiles.toml").is_file()


def test_library_caches_go_to_a_folder_of_the_commands_removed_when_it_ends(tmp_path, monkeypatch):
    """Torch inductor's folder (made when bitsandbytes is imported) and matplotlib's cache never land in the
    user's temporary directory or HOME, whichever command imports them; a user's own setting is kept."""
    from flows import cli

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "mine"))
    seen = {}

    def handler(args):
        folder = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
        folder.mkdir(parents=True)  # as inductor does on import
        seen.update(inductor=folder, mpl=os.environ["MPLCONFIGDIR"])
        return 0

    monkeypatch.setattr(cli, "_validate", handler)
    assert main(["validate", "whatever.yaml"]) == 0
    assert seen["inductor"].is_relative_to(tmp_path / "tmp") and seen["mpl"] == str(tmp_path / "mine")
    assert list((tmp_path / "tmp").iterdir()) == []  # removed with the command
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ
