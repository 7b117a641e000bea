"""bench/gpu_check.py: its smoke run on CPU (so the GPU script never rots), and its bookkeeping.

The smoke run is the same code as on a GPU at tiny sizes; the bookkeeping tests
(failure isolation, time budget, dependencies, exit status, command line) run in
this process without building any model.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO_ROOT))

from bench import gpu_check  # noqa: E402
from ftflow.data import synthetic  # noqa: E402

MODELS = ("llama", "granite", "qwen2")
CHECKS = ("build", "score[fp32]", "score[bf16]", "score[nf4]", "train[lora]", "train[qlora]", "train[prefix]",
          "train[full]", "train[distill]", "train[full-fit]")
EIGHT_B_CHECKS = ("build", "train[lora-fit]", "teacher[topk]")  # granite-8b: the 20 GB card's hardest runs
# Smoke shapes: hidden 64, MLP 128, 2 layers, 4 query / 2 key-value heads (kv dim 32), vocabulary 512, tied.
# Per layer: q 4096 + k 2048 + v 2048 + o 4096 + MLP 3 * 8192 + two norms 128 = 36,992; embedding 32,768;
# final norm 64. Qwen2 adds q/k/v biases (64 + 32 + 32 per layer). The students have one layer.
PARAMETERS = {"llama": 106_816, "granite": 106_816, "qwen2": 107_072}
STUDENT_PARAMETERS = {"llama": 69_824, "granite": 69_824, "qwen2": 69_952}
MATMUL_PARAMETERS = 2 * (4096 + 2048 + 2048 + 4096 + 3 * 8192) + 32_768  # the output layer is the tied embedding
LORA_R8_TRAINABLE = 2 * 8 * ((64 + 64) + (64 + 32) + (64 + 32) + (64 + 64) + 3 * (64 + 128))  # 16,384
PREFIX_8_TRAINABLE = 8 * 2 * 2 * 32  # virtual tokens x layers x (key, value) x kv dim


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One smoke run (every model, every check) on generated sentences, so ../shared is not needed."""
    root = tmp_path_factory.mktemp("gpu_check")
    data = root / "sentences.txt"
    data.write_text("\n".join(synthetic.generate_sentences(24, seed=3, domain="reviews")) + "\n")
    out = root / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "CUDA_VISIBLE_DEVICES": ""}
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--smoke", str(out), "--data", str(data)],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    return {"proc": proc, "out": out, "seconds": time.perf_counter() - started,
            "report": json.loads((out / "gpu_check.json").read_text()) if proc.returncode == 0 else None}


@pytest.mark.slow
def test_smoke_run_passes_every_check_with_numbers(smoke):
    proc = smoke["proc"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = smoke["report"]
    found = {(c["model"], c["check"]): c for c in report["checks"]}
    assert sorted(found) == sorted([(m, c) for m in MODELS for c in CHECKS]
                                   + [("granite-8b", c) for c in EIGHT_B_CHECKS])
    not_ok = {key: (c["status"], c["error"]) for key, c in found.items() if c["status"] != "ok"}
    assert not not_ok
    assert report["data"].endswith("sentences.txt")
    assert report["environment"]["device"] == "cpu"

    for model in MODELS:
        build = found[(model, "build")]["metrics"]
        assert (build["parameters"], build["student_parameters"]) == (PARAMETERS[model], STUDENT_PARAMETERS[model])
        assert build["matmul_parameters"] == MATMUL_PARAMETERS
        assert (build["vocab_size"], build["layers"], build["hidden_size"]) == (512, 2, 64)

        for precision in ("fp32", "bf16", "nf4"):
            m = found[(model, f"score[{precision}]")]["metrics"]
            for key in ("load_s", "evaluator_tokens_per_s", "loop_tokens_per_s", "speedup", "corpus_ppl",
                        "loop_corpus_ppl", "nll_rel_diff", "tflops", "weights_predicted_mb", "weights_measured_mb",
                        "peak_predicted_mb", "peak_measured_mb"):
                assert _finite(m[key]), (model, precision, key, m[key])
            assert m["sentences"] == 24 and m["scored_tokens"] == m["loop_tokens"] > 24
            # The evaluator and the one-sentence loop agree (random weights: PPL near the vocabulary size).
            assert m["nll_rel_diff"] <= 1e-4, (model, precision, m["nll_rel_diff"])
            assert 400 < m["corpus_ppl"] < 650
            assert m["tflops"] == pytest.approx(2 * MATMUL_PARAMETERS * m["evaluator_tokens_per_s"] / 1e12)
        # Predicted weights: exact bytes of the parameters at each precision.
        assert found[(model, "score[fp32]")]["metrics"]["weights_predicted_mb"] == pytest.approx(
            PARAMETERS[model] * 4 / 1e6)
        assert found[(model, "score[bf16]")]["metrics"]["weights_predicted_mb"] == pytest.approx(
            PARAMETERS[model] * 2 / 1e6)

        for method in ("lora", "qlora", "prefix", "full", "distill"):
            m = found[(model, f"train[{method}]")]["metrics"]
            for key in ("step_s", "tokens_per_s", "tflops", "peak_predicted_mb", "peak_measured_mb", "train_loss",
                        "validation_ppl_before", "validation_ppl_after", "run_s"):
                assert _finite(m[key]) and m[key] > 0, (model, method, key, m[key])
            assert (m["batch_size"], m["max_length"], m["steps"]) == (2, 32, 3)
            assert m["precision"] == ("nf4" if method == "qlora" else "fp32")
            assert m["tokens_per_s"] == pytest.approx(2 * 32 / m["step_s"])
        trainable = {method: found[(model, f"train[{method}]")]["metrics"]["trainable_parameters"]
                     for method in ("lora", "qlora", "prefix", "full", "distill")}
        assert trainable == {"lora": LORA_R8_TRAINABLE, "qlora": LORA_R8_TRAINABLE, "prefix": PREFIX_8_TRAINABLE,
                             "full": PARAMETERS[model], "distill": STUDENT_PARAMETERS[model]}
        distill = found[(model, "train[distill]")]["metrics"]
        assert distill["trained_parameters_of"] == "student" and distill["teacher_topk_tokens_per_s"] > 0
        assert distill["flops_formula"] == "6P"
        assert found[(model, "train[lora]")]["metrics"]["flops_formula"] == "4P+6T"
        assert found[(model, "train[qlora]")]["metrics"]["flops_formula"] == "6P+6T"
        # Full fine-tuning as ftflow/plan/fit.py makes it fit: bf16 weights, 8-bit AdamW, 1 x 2 micro-batches, checkpointing.
        fitted = found[(model, "train[full-fit]")]["metrics"]
        assert (fitted["precision"], fitted["trainable_parameters"], fitted["flops_formula"]) == (
            "bf16", PARAMETERS[model], "8P")
        assert _finite(fitted["peak_predicted_mb"]) and fitted["validation_ppl_after"] > 0
        # After training, as run_job does: the saved result reloaded and the test split scored; what of the
        # run was still alive before anything was collected is recorded (a leak shows there).
        for method in ("lora", "qlora", "prefix", "full", "distill", "full-fit"):
            m = found[(model, f"train[{method}]")]["metrics"]
            for key in ("reload_peak_predicted_mb", "reload_peak_measured_mb", "reload_test_ppl"):
                assert _finite(m[key]) and m[key] > 0, (model, method, key, m[key])
            assert m["reload_precision"] == ("nf4" if method == "qlora" else "fp32")
            assert isinstance(m["trained_alive_models"], int) and isinstance(m["trained_alive_optimizers"], int)
            assert 400 < m["reload_test_ppl"] < 650  # random weights: near the vocabulary size

    # Granite's forward with its real multipliers (granite-3.0-2b's: embeddings x12, logits / 8).
    granite = found[("granite", "build")]["metrics"]
    assert (granite["embedding_multiplier"], granite["attention_multiplier"], granite["residual_multiplier"],
            granite["logits_scaling"]) == (12.0, 0.015625, 0.22, 8.0)
    # The 8B model: LoRA at the micro-batch the plan chose (bf16, as the study trains it), the teacher pass at
    # the plan's scoring batch.
    eight = found[("granite-8b", "build")]["metrics"]
    assert (eight["logits_scaling"], eight["student_parameters"]) == (16.0, None)
    fit = found[("granite-8b", "train[lora-fit]")]["metrics"]
    assert fit["precision"] == "bf16" and fit["micro_batch_size"] * fit["accumulation_steps"] == fit["batch_size"]
    assert fit["fit_summary"].startswith("granite-8b lora: ") and _finite(fit["reload_peak_measured_mb"])
    teacher = found[("granite-8b", "teacher[topk]")]["metrics"]
    assert teacher["k"] == 100 and teacher["batch_size"] >= 1 and teacher["positions"] == teacher["batch_size"] * 32
    assert _finite(teacher["peak_measured_mb"]) and teacher["tokens_per_s"] > 0
    assert (teacher["peak_predicted_mb"] is None) == (not hasattr(gpu_check.plan_predict, "predict_teacher_pass"))


@pytest.mark.slow
def test_smoke_run_writes_the_markdown_summary_it_prints(smoke):
    assert smoke["proc"].returncode == 0, smoke["proc"].stderr[-3000:]
    summary = (smoke["out"] / "gpu_check.md").read_text()
    assert summary.startswith("# ftflow GPU check (smoke, CPU)\n")
    assert "Checks: 33 ok, 0 failed, 0 skipped." in summary
    assert summary in smoke["proc"].stdout
    for model in MODELS:
        for precision in ("fp32", "bf16", "nf4"):
            assert f"| {model} | {precision} | ok |" in summary
        for method in ("lora", "qlora", "prefix", "full"):
            assert f"| {model} | {method} | " in summary
        assert f"| {model} (student) | distill | fp32 |" in summary
    assert "| granite-8b | lora-fit | bf16 |" in summary
    assert "## Teacher pass at the planned batch" in summary and "| granite-8b | topk | ok |" in summary


# ----------------------------------------------------------------------------- bookkeeping, no models


def _settings(budget_s: float = 100.0) -> gpu_check.Settings:
    return gpu_check.Settings(device="cpu", smoke=True, budget_s=budget_s, n_sentences=4, n_validation=2,
                              eval_batch_size=2, steps=3, batch_size=2, max_length=16, train_precision="fp32",
                              tokenizer_vocab=300)


@pytest.mark.slow
def test_a_failing_check_is_recorded_and_the_next_ones_still_run():
    runner = gpu_check.Runner(_settings())
    far = time.perf_counter() + 100

    def broken():
        raise ValueError("no such tensor")

    failed = runner.run("m", "first", broken, far)
    ok = runner.run("m", "second", lambda: {"x": 1.5}, far)
    assert (failed["status"], failed["error"]) == ("failed", "ValueError: no such tensor")
    assert "raise ValueError" in failed["traceback"]
    assert (ok["status"], ok["error"], ok["metrics"]) == ("ok", None, {"x": 1.5})


@pytest.mark.slow
def test_skips_say_why_a_check_did_not_run():
    runner = gpu_check.Runner(_settings(budget_s=60))
    far = time.perf_counter() + 100

    def unavailable():
        raise gpu_check.SkipCheck("bitsandbytes 4-bit does not run on cpu: ...")

    def wrong():
        raise gpu_check.CheckFailed("corpus NLL differs", {"nll_rel_diff": 0.5})

    build = runner.run("m", "build", wrong, far)
    assert (build["status"], build["metrics"]) == ("failed", {"nll_rel_diff": 0.5})
    dependent = runner.run("m", "score[fp32]", lambda: {}, far, needs=build)
    assert (dependent["status"], dependent["error"]) == ("skipped", "needs build, which failed")
    skipped = runner.run("m", "train[qlora]", unavailable, far)
    assert (skipped["status"], skipped["error"]) == ("skipped", "bitsandbytes 4-bit does not run on cpu: ...")
    late = runner.run("m", "train[full]", lambda: {}, time.perf_counter() - 1)
    assert late["status"] == "failed"  # a check not run for lack of time did not pass
    assert late["error"].startswith("time budget: this model's share ran out (")
    assert late["error"].endswith("of 60 s); raise --budget-s or run fewer --models")


@pytest.mark.slow
def test_failed_checks_make_the_exit_status_1_and_are_listed(tmp_path, monkeypatch, capsys):
    def no_build(ctx):
        raise RuntimeError("disk full")

    monkeypatch.setattr(gpu_check, "check_build", no_build)
    # Threads, gc.freeze and library verbosity are process-wide: not in the test process.
    monkeypatch.setattr(gpu_check, "prepare_process", lambda settings: None)
    data = tmp_path / "s.txt"
    data.write_text("a good phone\nthe screen broke\n")
    status = gpu_check.main(["--smoke", str(tmp_path / "out"), "--models", "qwen2", "--data", str(data)])
    assert status == 1
    report = json.loads((tmp_path / "out/gpu_check.json").read_text())
    assert [(c["check"], c["status"]) for c in report["checks"]] == [("build", "failed")] + [
        (c, "skipped") for c in CHECKS[1:]]
    summary = (tmp_path / "out/gpu_check.md").read_text()
    assert "Checks: 0 ok, 1 failed, 9 skipped." in summary
    assert "| qwen2 | build | failed | RuntimeError: disk full |" in summary
    assert "| qwen2 | score[fp32] | skipped | needs build, which failed |" in summary
    assert "FAILED qwen2 build: RuntimeError: disk full" in capsys.readouterr().err


def test_bad_command_lines_are_refused_with_every_problem(capsys):
    with pytest.raises(SystemExit) as raised:
        gpu_check.settings_from(gpu_check.parse_args(["out", "--smoke", "--models", "llama,gpt2", "--steps", "2",
                                                      "--budget-s", "0"]))
    assert raised.value.code == 2
    err = capsys.readouterr().err
    assert "--models: unknown ['gpt2']; choose from llama,granite,qwen2,granite-8b" in err
    assert "--steps must be >= 3 (the first step is not timed), got 2" in err
    assert "--budget-s must be > 0, got 0.0" in err


def test_the_gpu_run_needs_a_gpu(monkeypatch, capsys):
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as raised:
        gpu_check.settings_from(gpu_check.parse_args(["out"]))
    assert raised.value.code == 2
    assert "no CUDA GPU is visible; run on a GPU machine, or use --smoke for the CPU version" in capsys.readouterr().err


def test_gpu_models_have_their_real_sizes():
    """The GPU models' parameter counts, from their configs on the meta device (nothing allocated)."""
    from ftflow.models import zoo

    tokenizer = zoo.train_tokenizer(synthetic.generate_sentences(50, seed=0, domain="reviews"), 300, seed=0)
    counts = {spec.name: gpu_check.architecture.count_config_parameters(gpu_check.model_config(spec, tokenizer))
              for spec in gpu_check.GPU_MODELS}
    # Llama-3.2-1B and Qwen2.5-0.5B as published. Granite 3.0 2B's shapes with 14 layers: embedding
    # 49155 x 2048, per layer q, o 2048^2, k, v 2048 x 512, MLP 3 x 2048 x 8192, two norms; a final norm.
    granite = 49155 * 2048 + 14 * (2 * 2048**2 + 2 * 2048 * 512 + 3 * 2048 * 8192 + 2 * 2048) + 2048
    assert counts == {"llama": 1_235_814_400, "granite": granite, "qwen2": 494_032_768, "granite-8b": 8_170_864_640}
    assert granite == 952_172_544
    llama = gpu_check.model_config(gpu_check.GPU_MODELS[0], tokenizer)
    assert gpu_check.matmul_parameters(llama) == 1_235_814_400 - 2048 * 33  # all but the 33 norm vectors


def test_training_documents_are_cut_to_exactly_the_training_length():
    from ftflow.models import zoo
    from ftflow.tokens import sentence_ids

    sentences = synthetic.generate_sentences(30, seed=1, domain="reviews")
    tokenizer = zoo.train_tokenizer(sentences, 300, seed=0)
    documents = gpu_check.training_documents(tokenizer, sentences, 5, 48)
    assert len(documents) == 5
    assert [sentence_ids(tokenizer, d, 48) for d in documents] == [
        (sentence_ids(tokenizer, d, 10**6)[0][:48], True) for d in documents]


def test_the_memory_cap_is_what_runs_are_planned_against(capsys):
    settings, specs = gpu_check.settings_from(gpu_check.parse_args(["out", "--smoke", "--memory-cap-gb", "20",
                                                                    "--models", "granite-8b"]))
    assert (settings.memory_cap_gb, gpu_check._budget_bytes(settings)) == (20.0, 20 * 10**9)
    assert [s.name for s in specs] == ["granite-8b"] and specs[0].checks == EIGHT_B_CHECKS
    report = {"environment": {}}
    gpu_check.cap_memory(settings, report)  # on a CPU: recorded, nothing capped
    assert report["environment"] == {"memory_cap_gb": 20.0, "planned_overhead_mb": 448 * 2**20 / 1e6}
    with pytest.raises(SystemExit) as raised:
        gpu_check.settings_from(gpu_check.parse_args(["out", "--smoke", "--memory-cap-gb", "0"]))
    assert raised.value.code == 2
    assert "--memory-cap-gb must be > 0, got 0.0" in capsys.readouterr().err


def test_granite_models_carry_the_real_multipliers():
    """From ftflow/models/known.py, as transcribed from the hub's config.json (they scale the forward)."""
    from ftflow.models import zoo

    tokenizer = zoo.train_tokenizer(synthetic.generate_sentences(50, seed=0, domain="reviews"), 300, seed=0)
    specs = {spec.name: spec for spec in gpu_check.GPU_MODELS}
    expected = {"granite": (12.0, 0.015625, 0.22, 8.0), "granite-8b": (12.0, 0.0078125, 0.22, 16.0)}
    for name, values in expected.items():
        config = gpu_check.model_config(specs[name], tokenizer)
        assert tuple(getattr(config, k) for k in gpu_check.GRANITE_SCALING) == values, name
    smoke = {spec.name: spec for spec in gpu_check.SMOKE_MODELS}
    assert smoke["granite"].numbers["logits_scaling"] == 8.0 and "logits_scaling" not in smoke["llama"].numbers
    eight = gpu_check.model_config(specs["granite-8b"], tokenizer)
    assert (eight.hidden_size, eight.num_hidden_layers, eight.intermediate_size, eight.vocab_size) == (
        4096, 40, 12800, 49159)
