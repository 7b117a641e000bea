"""bench/rehearsal.py: its verdicts (a row over its plan, a leak), a micro run with faults planted on purpose, its
stage sequence on the seed config, its tokenizer and its CPU bf16 matrix products."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO_ROOT))

from bench import rehearsal  # noqa: E402
from ftflow.plan import predict as plan_predict

SEED = REPO_ROOT / "configs" / "seed-20gb.yaml"
MB = 10**6


def _prediction(allocated_mb: float) -> plan_predict.MemoryPrediction:
    overhead = 512 * 2**20
    return plan_predict.MemoryPrediction(
        case="scoring", precision="fp32", batch_size=1, max_length=2, parameters=1, trainable_parameters=0,
        weights_bytes=0, logits_bytes=0, activations_bytes=0, overhead_bytes=overhead, gradients_bytes=0,
        optimizer_bytes=0, peak_bytes=int(allocated_mb * MB) + overhead)


def _stage(label: str, predicted_mb: float | None = 100.0, full_gb: float = 1.0) -> rehearsal.Stage:
    return rehearsal.Stage(label, "benchmark", "m", lambda: {}, None if predicted_mb is None else
                           _prediction(predicted_mb), int(full_gb * 1e9), "2x16")


def _settings(cap_gb: float = 20.0) -> rehearsal.Settings:
    return rehearsal.Settings(device="cpu", layers=1, micro=False, max_length=16, n_train=8, n_eval=2, epochs=1,
                              cap_bytes=int(cap_gb * 1e9), quick=True)


def _measured(mb: float, models: int = 0, optimizers: int = 0) -> dict:
    return {"ok": True, "measured_bytes": int(mb * MB), "raw_bytes": int(mb * MB), "seconds": 1.0, "facts": {},
            "alive": {"models": models, "optimizers": optimizers, "bytes": int(models * 50 * MB)}}


def test_a_stage_more_than_10_percent_over_its_plan_is_counted_and_fails_the_run():
    rows = [
        rehearsal.make_row(_stage("a"), _measured(105.0), _settings()),  # +5%: within
        rehearsal.make_row(_stage("b"), _measured(115.0), _settings()),  # +15%: over its plan
        rehearsal.make_row(_stage("c"), _measured(85.0), _settings()),  # -15%: the plan is not trusted either
    ]
    assert [(r["within"], round(r["error_pct"], 6)) for r in rows] == [(True, 5.0), (False, 15.0), (False, -15.0)]
    assert rehearsal.last_line(rows) == "rehearsal: 1 of 3 stages within 10% of plan, 0 over budget, 0 leaked"
    assert rehearsal.failed(rows)
    assert not rehearsal.failed(rows[:1])


def test_leaks_unplanned_stages_and_plans_over_the_cap_are_counted():
    leaked = rehearsal.make_row(_stage("leak"), _measured(100.0, models=1, optimizers=1), _settings())
    assert (leaked["within"], leaked["leaked"], leaked["leaked_objects"]) == (True, True, "1 model(s), 1 optimizer(s)")
    unplanned = rehearsal.make_row(_stage("teacher", predicted_mb=None), _measured(100.0), _settings())
    assert (unplanned["status"], unplanned["within"], unplanned["error_pct"]) == ("unplanned", False, None)
    over = rehearsal.make_row(_stage("big", full_gb=20.5), _measured(100.0), _settings(cap_gb=20))
    assert (over["within"], over["over_budget"]) == (True, True)
    skipped = rehearsal.make_row(rehearsal.Stage("x", "train", "m", lambda: {}, None, int(25e9), "-",
                                                 skipped="the plan skips it: too big"), None, _settings())
    assert (skipped["status"], skipped["over_budget"], skipped["within"]) == ("skipped", True, False)
    failed = rehearsal.make_row(_stage("oom"), {"ok": False, "error": "RuntimeError: boom"}, _settings())
    assert (failed["status"], failed["within"], failed["error"]) == ("failed", False, "RuntimeError: boom")
    rows = [leaked, unplanned, over, skipped, failed]
    assert rehearsal.last_line(rows) == "rehearsal: 2 of 5 stages within 10% of plan, 2 over budget, 1 leaked"
    table = rehearsal.markdown_table(rows)
    assert table[0] == "| " + " | ".join(rehearsal.COLUMNS) + " |"
    assert "| leak | 2x16 | 100 | 100 | +0.0% | yes | 1.00 | no | yes: 1 model(s), 1 optimizer(s), 50 MB |" in table[2]


def test_bad_command_lines_are_refused_with_every_problem(capsys):
    cfg = rehearsal.load_config(SEED)
    args = rehearsal.parse_args([str(SEED), "--layers", "0", "--max-length", "4096", "--sentences", "1",
                                 "--memory-cap-gb", "0"])
    with pytest.raises(SystemExit) as raised:
        rehearsal.settings_from(args, cfg)
    assert raised.value.code == 2
    err = capsys.readouterr().err
    for problem in ("--layers must be >= 1, got 0", "--max-length must be in [3, 2048] (the config's max_length), "
                    "got 4096", "--sentences must be >= 2, got 1", "--memory-cap-gb must be > 0, got 0"):
        assert problem in err
    with pytest.raises(SystemExit):
        rehearsal.prepare(rehearsal.parse_args([str(SEED), "--models", "gpt2"]))
    assert "--models: unknown ['gpt2']" in capsys.readouterr().err


def test_the_quick_stage_sequence_is_the_designs_on_the_seed_config():
    """Planned only (nothing built): the models, the stages ftflow/study/design.py decides, the full-depth fit plans."""
    r, _ = rehearsal.prepare(rehearsal.parse_args([str(SEED), "--quick"]))
    assert (r.teacher, r.student) == ("granite-3.3-8b-base", "granite-3.3-2b-base")
    assert sorted(r.models) == ["Qwen2.5-0.5B", "TinyLlama-1.1B-Chat-v1.0", "granite-3.3-2b-base",
                                "granite-3.3-8b-base"]
    # Real widths and vocabularies, one decoder layer; Granite with its multipliers.
    teacher = r.models[r.teacher].config
    assert (teacher.hidden_size, teacher.intermediate_size, teacher.vocab_size, teacher.num_hidden_layers) == (
        4096, 12800, 49159, 1)
    assert (teacher.logits_scaling, teacher.attention_multiplier) == (16.0, 0.0078125)
    stages = {s.label: s for s in rehearsal.stage_sequence(r)}
    kinds = [s.label.split("[")[0] for s in stages.values()]
    assert kinds.count("benchmark") == 4 and kinds.count("lora-grid") == 1 and kinds.count("prefix") == 1
    assert (kinds.count("lora"), kinds.count("qlora"), kinds.count("full")) == (3, 4, 3)
    assert (kinds.count("teacher"), kinds.count("distill"), kinds.count("evaluate")) == (2, 2, 1)
    assert "lora-grid[granite-3.3-8b-base|r16,a64,d0.05,lr0.0002]" in stages  # the grid's largest rank
    assert "prefix[granite-3.3-8b-base|p16,lr0.0002]" in stages
    # granite-3.3-2b-base in full fits 20 GB only with 8-bit AdamW on bf16 weights (the README's plan).
    full = stages["full[granite-3.3-2b-base|lr2e-05]"]
    assert "adamw-8bit, bf16 weights" in full.note and full.full_peak_bytes <= 20e9
    teacher_pass = stages["teacher[granite-3.3-8b-base+lora[r16,a64,d0.05,lr0.0002]|topk100]"]
    assert (teacher_pass.predicted is None) == (not hasattr(plan_predict, "predict_teacher_pass"))
    assert teacher_pass.needs == ("lora-grid[granite-3.3-8b-base|r16,a64,d0.05,lr0.0002]",)


def test_the_tokenizer_has_the_embeddings_rows_and_one_token_per_word(tmp_path):
    """Also as transformers 5 rebuilds it for a qwen2 checkpoint (Qwen2Tokenizer, its own pre-tokenizer)."""
    from transformers import Qwen2Config

    from ftflow.models.loading import load_tokenizer
    from ftflow.tokens import sentence_ids

    tokenizer = rehearsal.bpe_tokenizer(151936, with_bos=False)
    tokenizer.save_pretrained(tmp_path)
    Qwen2Config(vocab_size=151936, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=128).save_pretrained(tmp_path)
    loaded = load_tokenizer(str(tmp_path))
    assert type(loaded).__name__ == "Qwen2Tokenizer" and len(loaded) == 151936
    texts = rehearsal.sentences(3, 16, rehearsal._letters(151936), seed=0)
    assert [len(sentence_ids(loaded, text, 2048)[0]) for text in texts] == [16, 16, 16]
    assert sentence_ids(loaded, texts[0], 2048)[0][0] == loaded.eos_token_id  # no BOS: EOS starts a sentence


def test_cpu_bf16_products_in_fp32_blocks_match_torchs():
    """The shim gives torch's bf16 results: both accumulate in fp32 and round once to bf16, so they differ by at
    most one bf16 rounding step (2**-8 relative) where the summation order tips a tie."""
    import torch

    torch.manual_seed(0)
    a, b = torch.randn(5, 300, dtype=torch.bfloat16), torch.randn(300, 7, dtype=torch.bfloat16)
    bias = torch.randn(7, dtype=torch.bfloat16)
    batched = torch.randn(3, 5, 300, dtype=torch.bfloat16), torch.randn(3, 300, 7, dtype=torch.bfloat16)
    expected = [a @ b, torch.addmm(bias, a, b, beta=0.5, alpha=2.0), torch.bmm(*batched)]
    old_block = rehearsal.CpuBf16Matmul.BLOCK_ELEMENTS
    rehearsal.CpuBf16Matmul.BLOCK_ELEMENTS = 900  # 3 columns a block: several blocks
    try:
        with rehearsal.CpuBf16Matmul():
            got = [a @ b, torch.addmm(bias, a, b, beta=0.5, alpha=2.0), torch.bmm(*batched)]
            # The forward's layout (both operands contiguous along the reduction) is left to torch.
            weight = torch.randn(7, 300, dtype=torch.bfloat16, requires_grad=True)
            x = torch.randn(5, 300, dtype=torch.bfloat16, requires_grad=True)
            torch.nn.functional.linear(x, weight).float().sum().backward()
    finally:
        rehearsal.CpuBf16Matmul.BLOCK_ELEMENTS = old_block
    for want, have in zip(expected, got):
        assert have.dtype == torch.bfloat16 and have.shape == want.shape
        assert torch.allclose(have.float(), want.float(), rtol=2**-7, atol=1e-2)
    # Gradients through a linear layer (the backward's layouts go through the blocks).
    assert torch.allclose(x.grad.float(), weight.detach().float().sum(0).expand(5, 300), rtol=2**-7, atol=1e-2)
    assert torch.allclose(weight.grad.float(), x.detach().float().sum(0).expand(7, 300), rtol=2**-7, atol=1e-2)


# ----------------------------------------------------------------------------- a micro run


DRIVER = textwrap.dedent('''
    import dataclasses, sys
    import torch
    from bench import rehearsal

    KEPT = []
    BALLAST_BYTES = 200 * 10**6

    def leaking(stage):
        def run():
            import ftflow.models.loading as models
            loads = models.load_model
            def load_and_keep(*args, **kwargs):
                model = loads(*args, **kwargs)
                KEPT.append(model)  # alive after the stage: a leak planted on purpose
                return model
            models.load_model = load_and_keep
            try:
                return stage.run()
            finally:
                models.load_model = loads
        return dataclasses.replace(stage, label=stage.label + "+leak", run=run, warm_up_as=stage.label)

    def heavier(stage):
        def run():
            ballast = torch.ones(BALLAST_BYTES // 4)  # resident through the stage: over its plan on purpose
            try:
                return stage.run()
            finally:
                del ballast
        return dataclasses.replace(stage, label=stage.label + "+ballast", run=run, warm_up_as=stage.label)

    def adjust(stages):
        kept = [s for s in stages if s.label.startswith(("benchmark", "lora-grid", "teacher"))
                and not s.label.endswith("sampled100]")]
        bench = kept[0]
        return kept + [leaking(bench), heavier(bench)]

    sys.exit(rehearsal.main(sys.argv[1:], adjust_stages=adjust))
''')


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    out = tmp_path_factory.mktemp("rehearsal")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(SEED), "--micro", "--models", "granite-3.3-8b-base",
                           "--out", str(out)], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    rows = list(csv.DictReader(open(out / "rehearsal.csv"))) if (out / "rehearsal.csv").is_file() else []
    return {"proc": proc, "out": out, "rows": {row["stage"]: row for row in rows}}


@pytest.mark.slow
def test_micro_run_catches_a_planted_leak_and_memory_over_the_plan(micro):
    proc, rows = micro["proc"], micro["rows"]
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]  # the planted faults fail it
    bench = "benchmark[granite-3.3-2b-base|fp32]"
    assert list(rows)[:2] == [bench, "benchmark[granite-3.3-8b-base|bf16]"]
    twin, leak, heavy = rows[bench], rows[bench + "+leak"], rows[bench + "+ballast"]
    for row in (twin, leak, heavy):
        assert row["status"] == "ok" and float(row["measured_mb"]) > 0 and float(row["predicted_mb"]) > 0
    # The leak check is not vacuous: the same stage leaks nothing, and its model kept alive is caught.
    assert (twin["leaked"], leak["leaked"], leak["leaked_objects"]) == ("False", "True", "1 model(s)")
    assert float(leak["leaked_mb"]) > 0.1
    # The meter sees memory held during a stage: the ballast (200 MB) shows, and the stage is over its plan.
    added = float(heavy["measured_mb"]) - float(twin["measured_mb"])
    assert 180 < added < 220, added
    assert heavy["within"] == "False" and float(heavy["error_pct"]) > 10
    teacher = next(row for label, row in rows.items() if label.startswith("teacher["))
    assert teacher["status"] in ("ok", "unplanned")
    assert (teacher["status"] == "unplanned") == (not hasattr(plan_predict, "predict_teacher_pass"))


@pytest.mark.slow
def test_micro_run_writes_the_table_and_ends_with_the_verdict(micro):
    proc, rows, out = micro["proc"], micro["rows"], micro["out"]
    assert proc.returncode == 1, proc.stderr[-3000:]
    within = sum(row["within"] == "True" for row in rows.values())
    over = sum(row["over_budget"] == "True" for row in rows.values())
    leaked = sum(row["leaked"] == "True" for row in rows.values())
    verdict = f"rehearsal: {within} of {len(rows)} stages within 10% of plan, {over} over budget, {leaked} leaked"
    assert proc.stdout.rstrip().splitlines()[-1] == verdict
    assert len(rows) == 6 and leaked >= 1 and within < len(rows)
    markdown = (out / "rehearsal.md").read_text()
    assert markdown.startswith("# ftflow rehearsal of ")
    assert markdown.rstrip().endswith(verdict)
    assert "| " + " | ".join(rehearsal.COLUMNS) + " |" in markdown
    assert sum(line.startswith("| benchmark[") for line in markdown.splitlines()) == 4
    assert not (out / "work").exists()  # checkpoints and runs are removed (no --keep)
    json.dumps(rows)  # plain values only
