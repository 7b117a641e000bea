"""The answer: the recommended model, the runner-up and whether they are separable, one finding per study section."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ftflow.study import design
from ftflow.study.recommend import CONTROL, Evidence, answer_text, loading_lines, memory_fit, recommend, study_findings
from ftflow.study.report import leaderboard_markdown, leaderboard_rows
from ftflow.study.uncertainty import SentenceScores, paired_difference
from ftflow.train.jobs import parse_job

N = 60
TOKENS = np.random.default_rng(1).integers(4, 20, size=N)
BYTES = TOKENS * 5


def scores(level: float, spread: float = 0.3, seed: int = 0, tokens=TOKENS) -> SentenceScores:
    """Per-sentence NLL of a model whose mean NLL per token is about ``level`` nats."""
    noise = np.random.default_rng(seed).normal(0.0, spread, size=N)
    nll = tokens * (level + noise)
    return SentenceScores(nll=nll.astype(float), tokens=np.asarray(tokens), bytes=np.asarray(tokens) * 5,
                          fingerprint="test")


def scored(s: SentenceScores) -> dict:
    return {"corpus_ppl": s.value("ppl"), "bits_per_byte": s.value("bits_per_byte"), "n_sentences": N,
            "n_truncated": 0, "mean_sentence_ppl": 0.0}


def candidate(name, s, kind="lora", family="f", role="candidate", base="teacher", **extra):
    return {"name": name, "kind": kind, "family": family, "base": base, "precision": "fp32", "role": role,
            "test": scored(s), "selection": {"corpus_ppl": 1.0}, "model_dir": f"/runs/{name}/model",
            "hyperparameters": {"r": 8}, **extra}


DECISIONS = {"teacher": {"precision": "fp32", "batch_size": 32, "peak_bytes": int(2e9)},
             "student": {"precision": "fp32", "batch_size": 32, "peak_bytes": int(1e9)},
             "huge": {"precision": "bf16", "batch_size": 1, "peak_bytes": int(25e9)}}


def setup():
    lora = scores(1.70, seed=2)
    # Sentence by sentence a little better or worse than LoRA, about as good overall: within noise.
    shift = np.random.default_rng(9).normal(0.0, 0.05, N)
    shift += 0.001 - (TOKENS * shift).sum() / TOKENS.sum()  # 0.001 nats a token worse overall, exactly
    full = SentenceScores(nll=lora.nll + TOKENS * shift, tokens=lora.tokens, bytes=lora.bytes, fingerprint="test")
    s = {"teacher": scores(2.0, seed=1), "teacher+lora": lora, "teacher+full": full,
         "student+full[data=original-steps]": scores(1.50, seed=3),  # the best figure, but an ablation control
         "huge+lora": scores(1.2, seed=4)}
    candidates = [candidate("teacher", s["teacher"], kind="baseline", base="teacher", base_path="org/teacher"),
                  candidate("teacher+lora", s["teacher+lora"]),
                  candidate("teacher+full", s["teacher+full"], kind="full"),
                  candidate("student+full[data=original-steps]", s["student+full[data=original-steps]"], kind="full",
                            base="student", role=CONTROL),
                  candidate("huge+lora", s["huge+lora"], base="huge"),
                  {"name": "broken", "kind": "baseline", "family": "f", "error": "OutOfMemoryError", "role": "candidate"}]
    return candidates, Evidence(s)


def test_the_recommendation_is_the_lowest_test_ppl_that_fits_and_never_an_ablation_control():
    candidates, evidence = setup()
    answer = recommend(candidates, evidence, budget_gb=20, decisions=DECISIONS)
    assert answer["name"] == "teacher+lora" and answer["metric"] == "ppl"
    assert answer["runner_up"]["name"] == "teacher+full"
    assert answer["controls_excluded"] == 1 and set(answer["excluded"]) == {"huge+lora"}
    assert "predicted 25.00 GB to score" in answer["excluded"]["huge+lora"]
    winner = answer["winner"]
    interval = evidence.interval("teacher+lora")
    assert winner["test_ppl_interval"] == [interval.low, interval.high]
    assert winner["test_ppl_interval"][0] < winner["test_ppl"] < winner["test_ppl_interval"][1]
    assert winner["memory"] == ("predicted 2.00 GB to score (fp32, batch 32); not measured (no CUDA); budget 20 GB")
    # Winner and runner-up: a paired comparison, within noise here.
    expected = paired_difference(evidence.scores["teacher+lora"], evidence.scores["teacher+full"])
    assert answer["comparison"] == expected.to_dict() and answer["comparison"]["within_noise"]
    # Asked for: controls compete.
    asked = recommend(candidates, evidence, budget_gb=20, decisions=DECISIONS, include_controls=True)
    assert asked["name"] == "student+full[data=original-steps]" and asked["controls_excluded"] == 0
    # A bigger budget lets the 25 GB model in; a measured peak over the budget keeps a model out.
    assert recommend(candidates, evidence, budget_gb=30, decisions=DECISIONS)["name"] == "huge+lora"
    measured = [dict(c, peak_memory_bytes=int(21e9)) if c["name"] == "teacher" else c for c in candidates]
    out = recommend(measured, evidence, budget_gb=20, decisions=DECISIONS)
    # The teacher measured 21 GB while scoring: it and every run on it are out; the rest are out already.
    assert out["name"] is None and set(out["excluded"]) == {"teacher", "teacher+lora", "teacher+full", "huge+lora"}
    assert "measured 21.00 GB scoring on CUDA" in out["excluded"]["teacher+lora"]


def test_across_families_the_recommendation_is_by_bits_per_byte():
    other_tokens = TOKENS + 3  # another tokenizer: more tokens for the same text
    s = {"a": scores(2.0, seed=1), "b": scores(1.9, seed=2, tokens=other_tokens)}
    candidates = [candidate("a", s["a"], kind="baseline", base="a", family="f"),
                  candidate("b", s["b"], kind="baseline", base="b", family="g")]
    answer = recommend(candidates, Evidence(s), budget_gb=20, decisions={})
    assert answer["metric"] == "bits_per_byte"
    ranked = sorted(s, key=lambda n: s[n].value("bits_per_byte"))
    assert answer["name"] == ranked[0]
    assert answer["comparison"]["metric"] == "bits_per_byte"


def test_the_answer_opens_with_the_model_its_interval_memory_and_how_to_load_it():
    candidates, evidence = setup()
    answer = recommend(candidates, evidence, budget_gb=20, decisions=DECISIONS)
    text = answer_text(answer, ["best LoRA combination ...: finding"], config="my.yaml")
    lines = text.splitlines()
    assert lines[0] == "## Answer"
    assert lines[2].startswith("**Recommended: `teacher+lora`**: LoRA of `teacher` (family f), precision fp32; r 8")
    assert "95% bootstrap intervals over the 60 test sentences" in text
    assert "- on disk: `/runs/teacher+lora/model`" in text
    assert "model = AutoPeftModelForCausalLM.from_pretrained(\"/runs/teacher+lora/model\", dtype=\"float32\")" in text
    assert "`ftflow export my.yaml --to DIR`" in text
    assert "- runner-up: `teacher+full`" in text and "within noise: the test set cannot tell them apart" in text
    assert "1 ablation control(s) not considered" in text and "over the budget: huge+lora" in text
    assert text.rstrip().endswith("- best LoRA combination ...: finding")
    nothing = recommend([], evidence, budget_gb=20, decisions={})
    assert answer_text(nothing, []).startswith("## Answer\n\nNo model can be recommended")


def test_the_answer_of_a_moved_artifacts_directory_loads_the_model_from_where_it_is_now():
    """The evaluation manifest stores paths relative to artifacts_dir: the load lines must follow the directory."""
    from ftflow.artifacts import relative_paths, resolved_paths

    candidates, evidence = setup()
    for candidate in candidates:
        if "model_dir" in candidate:
            candidate["model_dir"] = candidate["model_dir"].replace("/runs/", "/old/artifacts/train/")
    answer = recommend(candidates, evidence, budget_gb=20, decisions=DECISIONS)
    written = relative_paths({"recommendation": answer}, Path("/old/artifacts"))
    moved = resolved_paths(json.loads(json.dumps(written)), Path("/new/place"))["recommendation"]
    text = answer_text(moved, [], config="my.yaml")
    assert "- on disk: `/new/place/train/teacher+lora/model`" in text
    assert "from_pretrained(\"/new/place/train/teacher+lora/model\", dtype=\"float32\")" in text
    assert "/old/" not in text


def test_the_leaderboard_keeps_controls_below_the_candidates_in_their_own_table():
    candidates, evidence = setup()
    frame = leaderboard_rows(candidates, intervals=evidence.interval, compare=evidence.compare,
                             answer={"teacher+lora": "recommended", "teacher+full": "runner-up"})
    assert list(frame["name"]) == ["huge+lora", "teacher+lora", "teacher+full", "teacher", "broken",
                                   "student+full[data=original-steps]"]
    assert list(frame["rank"])[:5] == [1, 2, 3, 4, 5] and frame["rank"].isna().iloc[5]
    assert frame.loc[5, "kind"] == "full (ablation control)" and frame.loc[5, "role"] == CONTROL
    assert frame.loc[1, "answer"] == "recommended"
    ci = evidence.interval("teacher+lora")
    assert frame.loc[1, "test_ppl_ci"] == f"[{ci.low:.4f}, {ci.high:.4f}]"
    versus = evidence.compare("teacher+lora", "teacher")
    assert frame.loc[1, "delta_vs_base_ci"] == f"[{versus.low:+.4f}, {versus.high:+.4f}] separable"
    text = leaderboard_markdown(frame)
    table, controls = text.split("Ablation controls")
    assert "student+full[data=original-steps]" not in table and "student+full[data=original-steps]" in controls
    assert "| 2 | recommended | teacher+lora |" in table
    ranked = leaderboard_rows(candidates, intervals=evidence.interval, controls_ranked=True)
    assert ranked.loc[0, "name"] == "huge+lora" and ranked["rank"].notna().sum() == 6


def test_models_scored_on_other_sentences_are_not_compared_and_the_refusal_is_kept():
    evidence = Evidence({"a": scores(2.0), "b": SentenceScores(nll=scores(2.0).nll, tokens=TOKENS, bytes=BYTES,
                                                               fingerprint="another split")})
    assert evidence.compare("a", "b") is None
    assert evidence.refused == ["a vs b: the two models were scored on different sentences (the splits' fingerprints "
                                "test and another spli differ), so they cannot be compared sentence by sentence"]
    assert evidence.compare("a", "missing") is None and len(evidence.refused) == 1


def test_memory_fit_reads_the_plans_and_the_measured_peak():
    run = {"name": "r", "base": "teacher", "fit_plan": {"fits": True, "peak_bytes": int(5e9), "budget_bytes": int(20e9)}}
    assert memory_fit(run, DECISIONS, 20, {}) == (True, "predicted 2.00 GB to score (fp32, batch 32); 5.00 GB to "
                                                        "train (training budget 20 GB); not measured (no CUDA); "
                                                        "budget 20 GB")
    assert memory_fit(run, DECISIONS, 20, {"teacher": int(20.5e9)})[0] is False
    assert memory_fit(run, DECISIONS, 1.5, {})[0] is False


def test_loading_lines_per_kind():
    assert loading_lines({"kind": "full", "model_dir": "/m", "precision": "bf16"}) == [
        "from transformers import AutoModelForCausalLM",
        "model = AutoModelForCausalLM.from_pretrained(\"/m\", dtype=\"bfloat16\")"]
    assert loading_lines({"kind": "baseline", "base_path": "org/x", "precision": "fp32", "name": "x"})[1] == (
        "model = AutoModelForCausalLM.from_pretrained(\"org/x\", dtype=\"float32\")")
    qlora = loading_lines({"kind": "qlora", "model_dir": "/a", "precision": "nf4",
                           "quantization": {"quant_type": "nf4", "double_quant": True, "compute_dtype": "bf16"}})
    assert qlora[0] == "from peft import AutoPeftModelForCausalLM; from transformers import BitsAndBytesConfig"
    assert "bnb_4bit_quant_type=\"nf4\"" in qlora[1] and "bnb_4bit_compute_dtype=\"bfloat16\"" in qlora[1]


# ----------------------------------------------------------------------------- the study's findings

def job_run(model: str, method: str, sel: float, s: SentenceScores, train_set="main", steps=None, **hyper) -> dict:
    defaults = {"lora": dict(r=8, alpha=16.0, dropout=0.05, target_modules="all-linear"),
                "qlora": dict(r=8, alpha=16.0, dropout=0.05, target_modules="all-linear", quant_type="nf4",
                              double_quant=True, compute_dtype="bf16"),
                "prefix": dict(num_virtual_tokens=4), "full": {}, "distill": dict(top_k=10, temperature=1.0,
                                                                                  alpha=0.5)}[method]
    job = parse_job({"method": method, **defaults, **hyper, "model": {"name": model, "family": "f"},
                     "learning_rate": 1e-3, "epochs": 2, "batch_size": 8, "train_set": train_set})
    return {"name": job.name, "title": job.title, "method": method, "settings_label": job.settings_label,
            "base_model": {"name": model, "family": "f"}, "job": job.model_dump(mode="json"),
            "best_validation_ppl": sel, "test": scored(s), "history": [{"epoch": 2, "step": steps or 10}]}


def test_one_finding_per_section_with_its_paired_interval():
    s = {"teacher": scores(2.0, seed=1), "student": scores(2.3, seed=5)}
    runs = [job_run("teacher", "lora", 5.0, scores(1.70, seed=2), r=8),
            job_run("teacher", "lora", 5.1, scores(1.702, seed=2), r=16),
            job_run("teacher", "qlora", 5.3, scores(1.80, seed=2)),
            job_run("teacher", "prefix", 5.5, scores(1.999, seed=1)),
            job_run("student", "full", 6.0, scores(2.0, seed=6), steps=96),
            job_run("student", "distill", 5.9, scores(1.9, seed=6), steps=96),
            job_run("student", "full", 6.1, scores(2.1, seed=6), train_set="original", steps=96),
            job_run("student", "full", 6.2, scores(2.05, seed=6), train_set="original-steps", steps=144)]
    mix = job_run("student", "full", 6.0, scores(2.0, seed=6), steps=96)  # the ablation's main run is the main one
    for run in runs:
        s[run["name"]] = SentenceScores(**{k: getattr(scores(0), k) for k in ("tokens", "bytes", "fingerprint")},
                                        nll=np.log(run["test"]["corpus_ppl"]) * TOKENS
                                        + np.random.default_rng(len(s)).normal(0, 0.01, N) * TOKENS)
        run["test"] = scored(s[run["name"]])
    evidence = Evidence(s)
    baselines = [{"name": "teacher", "test": scored(s["teacher"])},
                 {"name": "student", "test": scored(s["student"])}]
    ablation = {mix["name"]: "all methods (configured mix)", runs[6]["name"]: "original",
                runs[7]["name"]: "original, same steps (3 epochs, the augmented sets get 1.5 x 2)"}
    teacher = {"distil": True, "teacher_name": runs[0]["name"], "teacher_ppl": 5.0, "student_best": runs[4]["name"],
               "student_ppl": 6.0, "reason": "..."}
    lines = study_findings(baselines, runs, runs[0]["name"], ablation, teacher, evidence,
                           lora_grid=design.lora_grid_runs)
    assert [line.split(" ")[0] for line in lines] == ["best", "LoRA", "prefix", "distillation", "full",
                                                      "augmentation"]
    best, qlora, prefix, distill, full, augmentation = lines
    grid = evidence.compare(runs[0]["name"], runs[1]["name"])
    assert best.startswith("best LoRA combination (2 tried on teacher, chosen on the selection split): "
                           "r8,a16,d0.05,lr0.001, test PPL")
    assert f"against the next best, r16,a16,d0.05,lr0.001" in best and grid.text() in best
    assert f"against its base model: {evidence.compare(runs[0]['name'], 'teacher').text()}" in best
    assert qlora.startswith("LoRA vs QLoRA (same combination): teacher: ")
    assert evidence.compare(runs[0]["name"], runs[2]["name"]).text() in qlora
    lora_better = not evidence.compare(runs[0]["name"], runs[2]["name"]).within_noise
    assert ("LoRA better" in qlora) == lora_better
    assert prefix.startswith("prefix tuning (1 run(s), best on the selection split p4,lr0.001 on teacher): makes no "
                             "difference the test set can tell")
    d = evidence.compare(runs[5]["name"], runs[4]["name"])
    assert distill.startswith("distillation vs full fine-tuning at equal steps (96): "
                              + ("distillation helped" if not d.within_noise else "distillation made no difference"))
    assert d.text() in distill and f"teacher {runs[0]['name']} (selection PPL 5.0000)" in distill
    assert full.startswith("full fine-tuning (best run per model on the selection split): student ")
    a = evidence.compare(mix["name"], runs[7]["name"])
    assert augmentation.startswith("augmentation (configured mix) vs the original set trained for as many optimizer "
                                   "steps: ")
    assert a.text() in augmentation and "at equal epochs vs the original set" in augmentation
    skipped = study_findings(baselines, runs[:4], runs[0]["name"], {}, {"distil": False, "reason": "distillation was "
                             "skipped: x"}, evidence, lora_grid=design.lora_grid_runs)
    assert skipped[-1] == "distillation: not run; distillation was skipped: x"
    assert math.isfinite(grid.percent)


def test_a_finished_runs_answer_is_its_recommendation_and_findings_naming_the_config():
    from ftflow.study.recommend import evaluation_answer

    candidates, evidence = setup()
    answer = recommend(candidates, evidence, budget_gb=20, decisions=DECISIONS)
    evaluation = {"recommendation": answer, "findings": ["- best LoRA combination ...: finding"]}
    assert evaluation_answer(evaluation, "my.yaml") == answer_text(answer, evaluation["findings"], config="my.yaml")
    assert "`ftflow export my.yaml --to DIR`" in evaluation_answer(evaluation, "my.yaml")
    assert evaluation_answer({"recommendation": answer}) == answer_text(answer, [])
    assert evaluation_answer({"leaderboard": []}, "my.yaml") == ""  # written before ftflow made an answer
