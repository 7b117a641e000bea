"""The study's tables from run results: right rows, choices made on selection, honest differences."""

from __future__ import annotations

import pandas as pd
import pytest

from ftflow.study.report import markdown_table
from ftflow.study.tables import TABLE_COLUMNS, ablation_table, method_table, plot_methods, study_tables
from ftflow.train.jobs import parse_job


def score(ppl: float) -> dict:
    return {"corpus_ppl": ppl, "bits_per_byte": ppl / 10, "scored_tokens": 100, "n_truncated": 0}


# A job of each method, with its own hyperparameters (those a test does not give take these values).
DEFAULTS = {"lora": dict(r=8, alpha=16.0, dropout=0.05, target_modules="all-linear"),
            "qlora": dict(r=8, alpha=16.0, dropout=0.05, target_modules="all-linear", quant_type="nf4",
                          double_quant=True, compute_dtype="bf16"),
            "prefix": dict(num_virtual_tokens=4), "full": {}, "distill": dict(top_k=10, temperature=1.0, alpha=0.5)}


def run(model: str, method: str, selection: float, test: float, train_set: str = "main", **hyper) -> dict:
    job = parse_job({"method": method, **DEFAULTS[method], **hyper, "model": {"name": model, "family": "f"},
                     "learning_rate": 1e-3, "epochs": 2, "batch_size": 8, "train_set": train_set}
                    ).model_dump(mode="json")
    label = ",".join(f"{k}{v}" for k, v in hyper.items()) + f",{train_set}"
    return {"name": f"{model}+{method}[{label}]", "title": f"{method}[{model}|{label}]", "method": method,
            "settings_label": label, "base_model": {"name": model, "family": "f"}, "job": job,
            "best_validation_ppl": selection, "selection": score(selection), "test": score(test), "best_epoch": 1,
            "train_sentences": 100}


BASELINES = [{"name": "teacher", "family": "f", "parameters": 20, "test": score(10.0)},
             {"name": "student", "family": "f", "parameters": 10, "test": score(12.0)}]


def test_method_table_takes_each_methods_best_run_on_selection_not_test():
    runs = [run("teacher", "lora", 5.0, 9.5, r=8), run("teacher", "lora", 6.0, 8.0, r=16),  # better test, worse selection
            run("teacher", "qlora", 5.5, 9.7, r=8), run("student", "full", 7.0, 11.0)]
    frame = method_table(BASELINES, runs).set_index("model")
    assert frame.loc["teacher", "lora_ppl"] == 9.5  # chosen on selection (5.0), not the lower test 8.0
    assert frame.loc["teacher", "qlora_ppl"] == 9.7 and frame.loc["teacher", "baseline_ppl"] == 10.0
    assert frame.loc["student", "full_ppl"] == 11.0 and pd.isna(frame.loc["student", "lora_ppl"])


def test_grid_table_lists_every_combination_and_marks_the_chosen_one():
    runs = [run("teacher", "lora", 5.0, 9.5, r=8, alpha=16, dropout=0.05),
            run("teacher", "lora", 6.0, 8.0, r=16, alpha=32, dropout=0.05),
            run("student", "lora", 4.0, 7.0, r=8, alpha=16, dropout=0.05)]  # the best combination on another model
    tables = study_tables(BASELINES, runs, chosen_lora=runs[0]["name"])
    grid = tables["lora_grid"]
    assert list(grid["rank"]) == [8, 16] and list(grid["chosen"]) == ["✓", ""]
    text = markdown_table(grid, TABLE_COLUMNS["lora_grid"])
    assert "| 9.5000 | 5.0000 | 8 | 16 | 0.05 | 0.001 | 1 | ✓ |" in text  # settings shown as written


def test_ablation_table_measures_each_training_set_against_the_original():
    runs = [run("student", "full", 7.0, 10.0, train_set="original"),
            run("student", "full", 7.5, 11.0, train_set="main"),
            run("student", "full", 7.2, 10.5, train_set="synonym"),
            run("student", "full", 6.9, 10.0 * 1.05, train_set="original-steps")]
    labels = {runs[0]["name"]: "original", runs[1]["name"]: "all methods (configured mix)",
              runs[2]["name"]: "synonym only", runs[3]["name"]: "original, same steps (3 epochs)"}
    frame = ablation_table(runs, labels)
    assert list(frame["train_set"]) == ["original", "original, same steps (3 epochs)",
                                        "all methods (configured mix)", "synonym only"]
    assert list(frame["delta_ppl"]) == pytest.approx([0.0, 0.5, 1.0, 0.5])
    assert list(frame["delta_percent"]) == pytest.approx([0.0, 5.0, 10.0, 5.0])
    # Against the original set trained as many steps: the new sentences' own effect.
    assert frame["delta_percent_same_steps"].iloc[:2].isna().all()
    assert list(frame["delta_percent_same_steps"].iloc[2:]) == pytest.approx([100 * (11 / 10.5 - 1), 0.0])
    assert "| +10.00% |" in markdown_table(frame, TABLE_COLUMNS["augmentation"])
    # Each difference with its paired interval, against the run it is a difference to.
    Paired.calls.clear()
    paired = ablation_table(runs, labels, compare=lambda a, b: Paired(a, b, -1.0, 2.0))
    assert pd.isna(paired["delta_percent_ci"].iloc[0])  # the original set against itself: nothing to compare
    assert list(paired["delta_percent_ci"].iloc[1:]) == ["[-1.00%, +2.00%] within noise"] * 3
    assert list(paired["delta_percent_same_steps_ci"].iloc[2:]) == ["[-1.00%, +2.00%] within noise"] * 2
    assert (runs[1]["name"], runs[3]["name"]) in Paired.calls  # the mix against the original set at equal steps
    # Ablation runs are not mixed into the other tables.
    assert "augmentation" in study_tables(BASELINES, runs, None, labels)
    assert method_table(BASELINES, runs).loc[0, "full_ppl"] == 11.0


def test_skipped_runs_are_listed_with_their_reason(tmp_path):
    skipped = run("teacher", "prefix", 0, 0, num_virtual_tokens=4)
    skipped.update(skipped="predicted 30 GB, over the 20 GB budget", test=None, best_validation_ppl=None)
    frame = study_tables(BASELINES, [skipped, run("teacher", "lora", 5.0, 9.0, r=8)], None)["prefix"]
    assert frame.loc[0, "skipped"].startswith("predicted 30 GB") and frame.isna().loc[0, "ppl"]
    plot_methods(method_table(BASELINES, [run("teacher", "lora", 5.0, 9.0, r=8)]), tmp_path / "m.png")
    assert (tmp_path / "m.png").stat().st_size > 0


class Paired:
    """A stand-in for a paired comparison (ftflow.study.uncertainty.Comparison), recording what was compared."""

    calls: list = []

    def __init__(self, a, b, low=-3.0, high=-1.0):
        Paired.calls.append((a, b))
        self.percent_low, self.percent_high = low, high
        self.within_noise = low <= 0 <= high


def test_distillation_table_compares_each_variant_with_full_fine_tuning_at_the_same_steps():
    from ftflow.study.tables import distillation_notes, distillation_table

    def steps(r: dict, n: int) -> dict:
        return dict(r, history=[{"epoch": 1, "step": n // 2}, {"epoch": 2, "step": n}])

    runs = [steps(run("student", "full", 4.3, 4.20), 96), steps(run("student", "full", 4.1, 4.00), 192),  # 2x steps
            steps(run("student", "full", 4.0, 3.90, train_set="original"), 96),  # another training set
            steps(run("student", "distill", 4.2, 4.10, top_k=5, loss="topk"), 96),
            steps(run("student", "distill", 4.25, 4.15, top_k=5, loss="sampled"), 96)]
    teacher = {"distil": True, "teacher_name": "teacher+full[lr0.001]", "teacher_ppl": 3.2,
               "student_best": "student+full", "student_ppl": 4.1, "reason": "distilling from the best teacher run"}
    table = distillation_table(runs, teacher)
    assert list(table["variant"]) == ["topk", "sampled"]
    assert list(table["teacher"]) == ["teacher+full[lr0.001] (3.2000)"] * 2
    assert list(table["steps"]) == [96, 96] and list(table["full_ft_ppl"]) == [4.20, 4.20]
    assert list(table["delta_percent"]) == pytest.approx([100 * (4.10 - 4.20) / 4.20, 100 * (4.15 - 4.20) / 4.20])
    # The notes say how the teacher compared; the outcome, with its interval, is a finding of the answer.
    assert distillation_notes(table, teacher) == ["distilling from the best teacher run"]
    assert table["delta_percent_ci"].isna().all()  # no per-sentence scores given: no interval
    compared = distillation_table(runs, teacher, compare=lambda a, b: Paired(a, b))
    assert list(compared["delta_percent_ci"]) == ["[-3.00%, -1.00%] separable", "[-3.00%, -1.00%] separable"]
    assert Paired.calls[-2:] == [(runs[3]["name"], runs[0]["name"]), (runs[4]["name"], runs[0]["name"])]
    skipped = {"distil": False, "reason": "distillation was skipped: ..."}
    assert distillation_notes(None, skipped) == ["distillation was skipped: ..."]
    # Without a full fine-tune at the same steps, the reference columns stay empty.
    alone = distillation_table([runs[1], runs[3]], teacher)
    assert alone["full_ft_ppl"].isna().all()
