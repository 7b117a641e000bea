"""`ftflow export`: each kind of run written as a standalone checkpoint that plain library calls load back to the
run's test perplexity."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import AutoPeftModelForCausalLM, LoraConfig, PeftModel, PrefixTuningConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from ftflow.artifacts import relative_paths, write_json
from ftflow.models.loading import load_model, load_trained
from ftflow.perplexity import score_sentences
from ftflow.study.export import ExportError, export_run
from tests.tiny import SENTENCES, saved_base

pytestmark = pytest.mark.slow

QUANTIZATION = {"quant_type": "nf4", "double_quant": True, "compute_dtype": "fp32"}


def adapter(base: dict, kind: str, directory: Path, compute_dtype: str = "fp32") -> None:
    """An adapter with non-zero weights (as after training), saved with the tokenizer as a run saves it."""
    torch.manual_seed(3)
    if kind == "qlora":
        model = load_model(base["path"], "nf4", "cpu", quantization={**QUANTIZATION, "compute_dtype": compute_dtype})
    else:
        model = load_model(base["path"], "fp32", "cpu")
    config = (PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4) if kind == "prefix" else
              LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules="all-linear",
                         init_lora_weights=False))  # random B: the adapter changes the model, as a trained one does
    peft = get_peft_model(model, config)
    if kind != "prefix":
        with torch.no_grad():
            for name, parameter in peft.named_parameters():
                if "lora_B" in name:
                    parameter.mul_(0.2)  # a trained adapter's size: the model still scores in a sensible range
    peft.save_pretrained(directory)
    AutoTokenizer.from_pretrained(base["path"]).save_pretrained(directory)


def finished_run(tmp_path: Path, base: dict, kind: str, compute_dtype: str = "fp32") -> tuple[dict, float]:
    """A finished run's stage directory and the evaluation manifest naming it; the run's test PPL, scored as the
    run scored it (:func:`ftflow.models.loading.load_trained`)."""
    stage = tmp_path / f"train-{kind}"
    (stage / "model").mkdir(parents=True)
    run = {"name": f"tiny+{kind}", "method": kind, "base_model": base, "dir": str(stage), "files": {"model": "model"},
           "precision": "nf4" if kind == "qlora" else "fp32",
           "quantization": {**QUANTIZATION, "compute_dtype": compute_dtype} if kind == "qlora" else None,
           "job": {"method": kind, "learning_rate": 0.001, "epochs": 2}}
    if kind == "full":
        torch.manual_seed(5)
        model = load_model(base["path"], "fp32", "cpu")
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(0.01 * torch.randn_like(parameter))
        model.save_pretrained(stage / "model")
        AutoTokenizer.from_pretrained(base["path"]).save_pretrained(stage / "model")
        (stage / "model" / "README.md").write_text("the run's own card", encoding="utf-8")
    else:
        adapter(base, kind, stage / "model", compute_dtype)
    write_json(stage / "manifest.json", run)
    ppl = score_sentences(load_trained(run, "cpu"), AutoTokenizer.from_pretrained(base["path"]), SENTENCES,
                          progress=False).corpus_ppl
    return run, ppl


def evaluation(run: dict, ppl: float) -> dict:
    row = {"name": run["name"], "kind": run["method"], "parameters": 100_000, "test_ppl": ppl,
           "test_ppl_low": ppl * 0.9, "test_ppl_high": ppl * 1.1, "test_bits_per_byte": 1.5,
           "test_bpb_low": 1.4, "test_bpb_high": 1.6, "selection_ppl": ppl, "answer": "recommended"}
    return {"leaderboard": [row], "recommendation": {"name": run["name"]},
            "models": {run["name"]: {"kind": run["method"], "role": "candidate", "stage_dir": run["dir"]}}}


def rescored(model, tokenizer_dir: Path) -> float:
    return score_sentences(model, AutoTokenizer.from_pretrained(tokenizer_dir), SENTENCES, progress=False).corpus_ppl


@pytest.fixture()
def base(tmp_path):
    return saved_base(tmp_path / "base")


def test_lora_is_merged_into_the_base_weights_and_reloads_to_the_runs_ppl(base, tmp_path):
    run, ppl = finished_run(tmp_path, base, "lora")
    exported = export_run(evaluation(run, ppl), tmp_path / "out")  # the recommended model by default
    assert exported.kind == "lora" and exported.precision == "fp32" and "merge_and_unload" in exported.how
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md"} <= files
    assert "adapter_config.json" not in files  # merged: an ordinary checkpoint
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    # Merging adds B A into W once instead of computing x W + x A B: the same products, summed in another order.
    assert rescored(model, tmp_path / "out") == pytest.approx(ppl, rel=1e-4)
    assert rescored(model, tmp_path / "out") != pytest.approx(rescored(AutoModelForCausalLM.from_pretrained(base["path"]), base["path"]), rel=1e-3)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| test PPL, 95% interval (bootstrap over test sentences) |" in card and "as the recommended model" in card
    # The card's two lines load it, as written.
    namespace: dict = {}
    exec("\n".join(exported.load), namespace)
    assert rescored(namespace["model"], tmp_path / "out") == pytest.approx(ppl, rel=1e-4)


@pytest.mark.parametrize("compute_dtype, tolerance", [("fp32", 1e-5), ("bf16", 1e-2)])
def test_qlora_is_merged_into_a_dequantized_base(base, tmp_path, compute_dtype, tolerance):
    run, ppl = finished_run(tmp_path, base, "qlora", compute_dtype)
    exported = export_run(evaluation(run, ppl), tmp_path / "out")
    assert exported.precision == compute_dtype and "dequantized" in exported.how
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config  # plain weights: no bitsandbytes needed to load it
    namespace: dict = {}
    exec("\n".join(exported.load), namespace)  # the card's two lines: plain AutoModelForCausalLM, in that dtype
    model = namespace["model"]
    assert not any("4bit" in type(m).__name__ for m in model.modules())
    assert model.dtype == {"fp32": torch.float32, "bf16": torch.bfloat16}[compute_dtype]
    # The 4-bit layers dequantize their NF4 weights to the compute dtype and multiply there; the merged model
    # holds those same dequantized weights plus B A. In fp32 only the summation order differs (measured 2.5e-8;
    # 1e-5 leaves room for other kernels). In bf16 (8 significant bits, 2^-9 = 0.2% per rounding) the merged
    # model rounds W + B A once where the run rounded W and added x A B in its own rounding: measured 1.5e-4
    # relative in PPL here, 1e-2 bounds it on any kernel.
    assert rescored(model, tmp_path / "out") == pytest.approx(ppl, rel=tolerance)
    assert f"weights precision: {compute_dtype}" in (tmp_path / "out" / "README.md").read_text()


def test_prefix_tuning_is_exported_as_its_adapter_naming_the_base(base, tmp_path):
    run, ppl = finished_run(tmp_path, base, "prefix")
    exported = export_run(evaluation(run, ppl), tmp_path / "out")
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {
        p.name for p in (tmp_path / "out").iterdir()}
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"base_model: {base['path']}" in card and "library_name: peft" in card
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base["path"]), tmp_path / "out")
    assert rescored(model, tmp_path / "out") == pytest.approx(ppl, rel=1e-5)  # the same adapter on the same base
    assert rescored(AutoPeftModelForCausalLM.from_pretrained(tmp_path / "out"), tmp_path / "out") == pytest.approx(ppl, rel=1e-5)
    assert exported.load[0] == "from peft import AutoPeftModelForCausalLM"


def test_a_full_fine_tune_is_copied_with_a_new_card_and_an_existing_directory_is_refused(base, tmp_path):
    run, ppl = finished_run(tmp_path, base, "full")
    exported = export_run(evaluation(run, ppl), tmp_path / "out")
    assert exported.kind == "full"
    assert rescored(AutoModelForCausalLM.from_pretrained(tmp_path / "out"), tmp_path / "out") == pytest.approx(ppl, rel=1e-6)
    assert "the run's own card" not in (tmp_path / "out" / "README.md").read_text()
    before = sorted(p.name for p in (tmp_path / "out").iterdir())
    with pytest.raises(ExportError, match="exists and is not an empty directory"):
        export_run(evaluation(run, ppl), tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == before  # nothing touched
    with pytest.raises(ExportError, match=r"no model named 'tiny\+fll'; did you mean|no model named"):
        export_run(evaluation(run, ppl), tmp_path / "elsewhere", "tiny+fll")
    assert not (tmp_path / "elsewhere").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def test_a_run_as_written_by_its_stage_exports_from_a_moved_artifacts_directory(base, tmp_path, monkeypatch):
    """A stage writes its manifest's paths relative to the artifacts directory: export resolves them against the
    directory the run is in now, whatever the working directory."""
    root = tmp_path / "artifacts"
    run, ppl = finished_run(root / "train", base, "full")
    stage = Path(run["dir"])
    write_json(stage / "manifest.json", relative_paths(run, root))
    moved = tmp_path / "moved"
    root.rename(moved)
    monkeypatch.chdir(tmp_path / "base")
    stage_dir = moved / "train" / stage.name
    exported = export_run(evaluation({**run, "dir": str(stage_dir)}, ppl), tmp_path / "out")
    assert rescored(AutoModelForCausalLM.from_pretrained(tmp_path / "out"), tmp_path / "out") == pytest.approx(ppl, rel=1e-6)


def test_an_export_that_does_not_fit_in_memory_is_refused_with_the_figures(base, tmp_path, monkeypatch):
    from ftflow.study import export

    run, ppl = finished_run(tmp_path, base, "lora")
    huge = evaluation(run, ppl)
    huge["leaderboard"][0]["parameters"] = 8_000_000_000
    monkeypatch.setattr(export, "_available_bytes", lambda device, margin: int(12e9))
    with pytest.raises(ExportError, match=r"about 32\.0 GB for the weights in fp32 \(8,000,000,000 parameters\) but "
                                          r"cpu has 12\.0 GB free; use --device cuda"):
        export_run(huge, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    shutil.rmtree(tmp_path / "train-lora")
