"""The study's design: the exact jobs each decision gives for a config and the stages' results."""

from __future__ import annotations

import pytest

from ftflow.config import ModelSpec, parse_config
from ftflow.study import design
from ftflow.train.jobs import DistillJob, FullJob, LoraJob, PrefixJob, QLoraJob

MODELS = [{"name": n, "path": f"/m/{n}", "family": "f", "precision": "fp32", "trust_remote_code": False}
          for n in ("big", "small", "other")]
BIG, SMALL, OTHER = MODELS
BENCHMARKS = [{"name": m["name"], "model": m, "parameters": p} for m, p in zip(MODELS, (8_000, 2_000, 1_000))]
SELECTION = {"teacher": "big", "student": "small", "teacher_model": BIG, "student_model": SMALL}
BEST = LoraJob(model=BIG, r=16, alpha=32.0, dropout=0.05, target_modules="all-linear", learning_rate=2e-4, epochs=2,
               batch_size=8)


def config(tmp_path, **sections):
    return parse_config({"data": {"synthetic": {}}, "models": [{"name": "x", "path": "/x", "family": "f"}],
                         **sections}, tmp_path)


def test_grids_and_per_model_methods_are_exact_jobs(tmp_path):
    cfg = config(tmp_path, lora={"r": [8, 16], "alpha": 32, "learning_rate": 2e-4}, finetune={"max_params": 5_000},
                 prefix={"num_virtual_tokens": [4], "learning_rate": [1e-3]},
                 distill={"top_k": [10, 100], "temperature": 2.0})
    assert design.lora_grid_jobs(cfg, SELECTION) == [
        LoraJob(model=BIG, r=8, alpha=32.0, dropout=0.05, target_modules="all-linear", learning_rate=2e-4, epochs=2,
                batch_size=8), BEST]
    qlora = dict(r=16, alpha=32.0, dropout=0.05, target_modules="all-linear", learning_rate=2e-4, epochs=2,
                 batch_size=8, quant_type="nf4", double_quant=True, compute_dtype="bf16")
    assert design.per_model_jobs(cfg, BENCHMARKS, SELECTION, BEST) == [
        QLoraJob(model=BIG, **qlora),  # QLoRA: every compared model; LoRA on the teacher is the grid's best
        BEST.model_copy(update={"model": SMALL}), QLoraJob(model=SMALL, **qlora),
        FullJob(model=SMALL, learning_rate=5e-5, epochs=2, batch_size=8),  # big: over finetune.max_params
        PrefixJob(model=BIG, num_virtual_tokens=4, learning_rate=1e-3, epochs=2, batch_size=8),
    ]
    assert design.left_out_of_full_fine_tuning(cfg, BENCHMARKS, SELECTION) == [
        "big is not fine-tuned in full: 8,000 parameters > finetune.max_params 5,000"]
    assert design.distillation_jobs(cfg, SELECTION) == [
        DistillJob(model=SMALL, top_k=k, temperature=2.0, alpha=0.5, learning_rate=5e-5, epochs=2, batch_size=8)
        for k in (10, 100)]
    # Typed jobs read back from a manifest as they were written.
    job = design.per_model_jobs(cfg, BENCHMARKS, SELECTION, BEST)[1]
    manifest = {"key": "k", "name": job.name, "job": job.model_dump(mode="json")}
    assert design.TrainedRun.model_validate(manifest).job == job


def test_best_lora_is_the_grid_run_lowest_on_selection():
    runs = [{"key": str(i), "name": f"r{i}", "title": f"r{i}", "best_validation_ppl": ppl,
             "job": BEST.model_copy(update={"r": r}).model_dump(mode="json")}
            for i, (ppl, r) in enumerate([(5.0, 8), (4.0, 16), (4.0, 32)])]
    best, job = design.best_lora(runs)
    assert best is runs[1] and job == BEST  # ties: the earlier run
    assert design.unique_runs(runs + [runs[1], runs[0]]) == runs


def _run(job, ppl, skipped=None):
    return {"key": job.title, "name": job.name, "title": job.title, "method": job.method, "base_model": job.model,
            "job": job.model_dump(mode="json"), "best_validation_ppl": ppl, "skipped": skipped}


SCORED = [dict(b, validation={"corpus_ppl": ppl}) for b, ppl in zip(BENCHMARKS, (9.0, 8.0, 7.0))]


def test_the_teacher_is_its_best_run_of_any_method_when_it_beats_the_students_best(tmp_path):
    cfg = config(tmp_path)
    full_teacher, lora_teacher = FullJob(model=BIG, learning_rate=1e-3, epochs=2, batch_size=8), BEST
    runs = [_run(lora_teacher, 4.44), _run(full_teacher, 3.20), _run(FullJob(model=SMALL, learning_rate=1e-3,
            epochs=2, batch_size=8), 4.19), _run(PrefixJob(model=BIG, num_virtual_tokens=4, learning_rate=1e-2,
            epochs=2, batch_size=8), 2.0, skipped="over the budget"),
            _run(full_teacher.model_copy(update={"train_set": "original"}), 1.0)]  # the ablation's: not main
    choice = design.distillation_teacher(cfg, SELECTION, runs, SCORED)
    assert choice.distil and choice.teacher is not None and choice.teacher["name"] == "big+full[lr0.001]"
    assert (choice.teacher_ppl, choice.student_best, choice.student_ppl) == (3.20, "small+full[lr0.001]", 4.19)
    assert choice.teacher_beats
    assert choice.reason == ("distilling from the best teacher run, which beats the student: teacher "
                             "big+full[lr0.001] (validation PPL 3.2000) vs the student's own best small+full[lr0.001] "
                             "(4.1900)")


def test_distillation_is_judged_by_measurement_not_by_whether_the_teacher_beats_the_student(tmp_path):
    # The case: the teacher's best run (validation 4.44) does not beat the student's (4.19), yet distilling
    # from it may beat the student's full fine-tune at equal steps; by default it is distilled, and the report's
    # paired comparison says whether it helped.
    runs = [_run(BEST, 4.44), _run(FullJob(model=SMALL, learning_rate=1e-3, epochs=2, batch_size=8), 4.19)]
    choice = design.distillation_teacher(config(tmp_path), SELECTION, runs, SCORED)
    assert choice.distil and choice.teacher["name"] == "big+lora[r16,a32,d0.05,lr0.0002]"
    assert choice.teacher_beats is False
    assert choice.reason == (
        "distilling from the best teacher run although it does not beat the student's own best on the validation "
        "split (the equal-steps comparison with full fine-tuning measures whether it helps; "
        "distill.require_better_teacher: true would skip it): teacher big+lora[r16,a32,d0.05,lr0.0002] (validation "
        "PPL 4.4400) vs the student's own best small+full[lr0.001] (4.1900)")
    # Asked to require a better teacher: skipped, with both figures.
    strict = config(tmp_path, distill={"require_better_teacher": True})
    skipped = design.distillation_teacher(strict, SELECTION, runs, SCORED)
    assert not skipped.distil and skipped.teacher is None
    assert skipped.reason == (
        "distillation was skipped (distill.require_better_teacher): the best teacher run does not beat the student "
        "on the validation split (teacher big+lora[r16,a32,d0.05,lr0.0002] (validation PPL 4.4400) vs the "
        "student's own best small+full[lr0.001] (4.1900))")
    # The student's baseline counts as its own best too: no student run here, its benchmark is 8.0.
    assert not design.distillation_teacher(strict, SELECTION, [_run(BEST, 8.0)], SCORED).distil
    assert design.distillation_teacher(strict, SELECTION, [_run(BEST, 7.9)], SCORED).student_best == (
        "small (baseline)")
    # Tokenizers that do not allow it: skipped whatever the figures, saying why.
    refused = design.distillation_teacher(config(tmp_path), SELECTION, runs, SCORED, "the vocabularies differ")
    assert not refused.distil and refused.reason.startswith("distillation was skipped: the vocabularies differ (")


def test_distillation_variants_and_their_equal_budget_reference(tmp_path):
    cfg = config(tmp_path, distill={"loss": ["topk", "sampled"], "top_k": [5, 20], "learning_rate": 1e-3,
                                    "epochs": 3, "batch_size": 4})
    assert design.distillation_variants(cfg) == ("topk", "sampled")
    assert [j.settings_label for j in design.distillation_jobs(cfg, SELECTION)] == [
        "top5,T1,a0.5,lr0.001", "top20,T1,a0.5,lr0.001", "sample5,T1,a0.5,lr0.001", "sample20,T1,a0.5,lr0.001"]
    assert [j.loss for j in design.distillation_jobs(cfg, SELECTION, "sampled")] == ["sampled", "sampled"]
    assert design.distillation_reference(cfg, SELECTION) == FullJob(model=SMALL, learning_rate=1e-3, epochs=3,
                                                                    batch_size=4)


def test_ablation_with_augmentation_on_adds_the_original_set_each_method_and_the_same_steps_run(tmp_path):
    cfg = config(tmp_path, ablation={"enabled": True}, augment={"factor": 2.0, "methods": {
        "synonym": 1.0, "random_swap": 0.5, "random_delete": 0.0}})
    runs = design.ablation_runs(cfg, SELECTION, BEST)
    assert [(r.job.train_set, r.job.epochs, r.train_set.source, r.train_set.run_name) for r in runs] == [
        ("main", 2, "main", None), ("original", 2, "original", None),
        ("random_swap", 2, "augment", "augment[random_swap]"), ("synonym", 2, "augment", "augment[synonym]"),
        ("original-steps", 4, "original", None)]  # 2 epochs x factor 2: as many optimizer steps
    assert all(r.job == BEST.model_copy(update={"train_set": r.job.train_set, "epochs": r.job.epochs}) for r in runs)
    assert runs[2].train_set.augment == cfg.augment.model_copy(update={"methods": {"random_swap": 1.0}})
    assert design.ablation_labels(runs) == {
        "big+lora[r16,a32,d0.05,lr0.0002]": "all methods (configured mix)",
        "big+lora[r16,a32,d0.05,lr0.0002,data=original]": "original",
        "big+lora[r16,a32,d0.05,lr0.0002,data=random_swap]": "random_swap only",
        "big+lora[r16,a32,d0.05,lr0.0002,data=synonym]": "synonym only",
        "big+lora[r16,a32,d0.05,lr0.0002,data=original-steps]":
            "original, same steps (4 epochs, the augmented sets get 2 x 2)"}


def test_ablation_with_augmentation_off_makes_the_mix_for_the_comparison_only(tmp_path):
    cfg = config(tmp_path, ablation={"enabled": True, "method": "full", "per_method": False},
                 augment={"enabled": False, "factor": 1.2})
    runs = design.ablation_runs(cfg, SELECTION, BEST)
    assert [r.job for r in runs] == [FullJob(model=SMALL, learning_rate=5e-5, epochs=2, batch_size=8, train_set=s)
                                     for s in ("main", "augmented")]  # round(2 x 1.2) = 2 epochs: no extra run
    assert [(r.train_set.source, r.train_set.label) for r in runs] == [
        ("original", "original"), ("augment", "all methods (configured mix)")]
    assert runs[1].train_set.augment == cfg.augment.model_copy(update={"enabled": True})
    assert design.ablation_runs(config(tmp_path), SELECTION, BEST) == []  # ablation off


def test_benchmark_plan_and_evaluation_batch_size_follow_the_memory_plan(tmp_path):
    specs = [ModelSpec(name=n, path=f"/m/{n}", family="f", precision="auto") for n in ("a", "b", "c")]
    decisions = {"a": {"precision": "bf16", "batch_size": 16, "reason": "fits"},
                 "b": {"precision": None, "batch_size": None, "reason": "needs 33 GB"},
                 "c": {"precision": "fp32", "batch_size": 4, "reason": "fits"}}
    planned, failures = design.benchmark_plan(specs, decisions)
    assert [(s.name, s.precision, b) for s, b in planned] == [("a", "bf16", 16), ("c", "fp32", 4)]
    assert failures == [{"name": "b", "family": "f", "precision": "auto", "error": "needs 33 GB"}]
    assert design.evaluation_batch_size(config(tmp_path, benchmark={"batch_size": "auto"}), decisions) == 4
    assert design.evaluation_batch_size(config(tmp_path, benchmark={"batch_size": 32}), decisions) == 32
    assert design.evaluation_batch_size(config(tmp_path, benchmark={"batch_size": "auto"}), {}) == 1


def test_a_candidate_left_out_before_planning_or_whose_benchmark_failed_never_lowers_the_evaluation_batch(tmp_path):
    specs = [ModelSpec(name=n, path=f"org/{n}", family="f", precision="auto") for n in ("a", "gated", "ghost")]
    plan = {"budget_gb": 20, "decisions": {"a": {"precision": "bf16", "batch_size": 64, "reason": "fits"},
                                           "ghost": {"precision": "fp32", "batch_size": 3, "reason": "fits"}}}
    whole = design.with_unavailable(plan, specs, {"gated": "org/gated is gated and no Hugging Face token is set"})
    assert list(whole["decisions"]) == ["a", "gated", "ghost"] and whole["budget_gb"] == 20
    planned, failures = design.benchmark_plan(specs, whole["decisions"])
    assert [s.name for s, _ in planned] == ["a", "ghost"]
    assert failures == [{"name": "gated", "family": "f", "precision": "auto",
                         "error": "org/gated is gated and no Hugging Face token is set"}]
    cfg = config(tmp_path, benchmark={"batch_size": "auto"})
    # ghost was planned, but its benchmark failed: the scoring passes after the benchmark never score it again.
    assert design.evaluation_batch_size(cfg, whole["decisions"]) == 3
    assert design.evaluation_batch_size(cfg, whole["decisions"], benchmarked=["a"]) == 64


def test_a_job_of_one_method_refuses_another_methods_settings():
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        FullJob(model=SMALL, learning_rate=1e-3, epochs=1, batch_size=2, num_virtual_tokens=4)


def test_each_familys_teacher_is_checked_against_its_student_before_fine_tuning():
    benchmarks = [{"name": n, "family": f, "parameters": p, "validation": {"corpus_ppl": ppl}}
                  for n, f, p, ppl in [("g-student", "granite", 1_000, 178.0), ("g-teacher", "granite", 4_000, 216.0),
                                       ("q-student", "qwen2", 1_000, 9.5), ("q-teacher", "qwen2", 3_000, 7.25),
                                       ("alone", "llama", 2_000, 5.0)]]
    assert design.family_teacher_check(benchmarks) == [
        (False, "family granite: teacher g-teacher (4,000 parameters) validation PPL 216.0000 vs student g-student "
                "(1,000) 178.0000 before fine-tuning: the teacher does NOT beat its student, so it can hardly teach "
                "it (zoo: pretrain the teacher longer, zoo.teacher_pretrain_steps or zoo.teacher_extra_rounds, or on "
                "text closer to the task, zoo.corpus_file and zoo.task_text)"),
        (True, "family qwen2: teacher q-teacher (3,000 parameters) validation PPL 7.2500 vs student q-student "
               "(1,000) 9.5000 before fine-tuning: the teacher beats its student"),
    ]  # llama has one model: nothing to compare
