"""The disk a study needs: downloads (hub sizes, or parameters at the hub's dtype), kept outputs, checkpoints in
flight; and the check against free space (``shutil.disk_usage`` patched)."""

from __future__ import annotations

import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import yaml

from ftflow.config import load_config
from ftflow.models.architecture import count_config_parameters, model_config_for, parameter_counts
from ftflow.models.hub import HubCheck
from ftflow.plan import disk
from ftflow.plan.study import plan_study
from tests.tiny import SENTENCES, saved_base

Usage = namedtuple("Usage", "total used free")


def small_study(tmp_path: Path) -> Path:
    """Two local tiny Llamas of one family (teacher and student), LoRA r 4, full fine-tuning, top-k distillation."""
    saved_base(tmp_path / "teacher", hidden_size=128)
    saved_base(tmp_path / "student", hidden_size=64)
    (tmp_path / "train.txt").write_text("\n".join(SENTENCES * 5) + "\n")
    (tmp_path / "test.txt").write_text("\n".join(SENTENCES) + "\n")
    raw = {"name": "small", "device": "cpu", "max_length": 32, "artifacts_dir": str(tmp_path / "artifacts"),
           "data": {"train_file": "train.txt", "test_file": "test.txt", "validation_fraction": 0.2},
           "augment": {"enabled": False}, "ablation": {"enabled": False},
           "models": [{"name": "teacher", "path": str(tmp_path / "teacher"), "family": "tiny"},
                      {"name": "student", "path": str(tmp_path / "student"), "family": "tiny"}],
           "select": {"student_max_params": 10**9}, "lora": {"r": 4, "batch_size": 4},
           "qlora": {"enabled": False}, "prefix": {"enabled": False},
           "finetune": {"max_params": 10**9, "batch_size": 4},
           "distill": {"loss": "topk", "top_k": 5, "batch_size": 4}}
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_outputs_and_checkpoints_of_a_small_study_from_first_principles(tmp_path):
    cfg = load_config(small_study(tmp_path))
    study = plan_study(cfg, device="cpu", bf16_supported=True)
    plan = disk.plan_disk(cfg, study, {}, hub_cache=tmp_path / "hf")
    teacher, student = (count_config_parameters(model_config_for(str(tmp_path / n))) for n in ("teacher", "student"))
    lora_teacher = parameter_counts(model_config_for(str(tmp_path / "teacher"))).lora(4)
    lora_student = parameter_counts(model_config_for(str(tmp_path / "student"))).lora(4)
    # LoRA on the teacher (the grid), per model LoRA on the student and both fine-tuned in full; the student's
    # top-k distillation (its full fine-tune at equal steps is the per-model one).
    assert sorted(r.fit.method for r in study.runs) == ["distill", "full", "full", "lora", "lora"]
    assert [d.bytes for d in plan.downloads] == [0, 0]  # local directories
    adapters = (lora_teacher + lora_student) * 4  # fp32 adapters
    full = (teacher + 2 * student) * 4  # fp32 checkpoints: the teacher's, the student's full and distilled
    positions = study.stats["teacher"]["train"].total
    store = positions * 5 * 6 + positions * 4  # int32 id + fp16 log-prob per id, fp32 tail
    assert plan.outputs_bytes == adapters + full + store + 5 * disk.TOKENIZER_BYTES
    # The largest checkpoint: the teacher's full fine-tune, fp32 weights and two fp32 AdamW moments, twice.
    assert plan.in_flight_bytes == 2 * (teacher * 4 + teacher * 8)
    assert plan.outputs_detail == [f"2 adapters {disk.size_text(adapters + 2 * disk.TOKENIZER_BYTES)}",
                                   f"3 full checkpoints {disk.size_text(full + 3 * disk.TOKENIZER_BYTES)}",
                                   f"1 teacher store {disk.size_text(store)}"]
    # What is cached already needs nothing more.
    done = [r.title for r in study.runs] + ["teacher_logits[teacher|topk5]"]
    assert disk.plan_disk(cfg, study, {}, hub_cache=tmp_path / "hf", done=done).outputs_bytes == 0


def test_a_model_benchmarked_at_two_precisions_is_downloaded_once(tmp_path):
    cfg = load_config(small_study(tmp_path))
    study = plan_study(cfg, device="cpu", bf16_supported=True)
    study.models = [{**m, "name": f"qwen-{p}", "path": "Qwen/Qwen2.5-0.5B"} for m, p in zip(study.models, ("a", "b"))]
    study.parameters.update({"qwen-a": 494_032_768, "qwen-b": 494_032_768})
    plan = disk.plan_disk(cfg, study, {}, hub_cache=tmp_path / "hf")
    assert plan.downloads == [disk.Download("Qwen/Qwen2.5-0.5B", 494_032_768 * 2, "0.49B parameters in bf16")]


def test_downloads_from_the_hubs_sizes_or_the_parameters_at_the_hubs_dtype():
    listed = HubCheck("org/m", "ok", files=(("config.json", 700), ("model.safetensors", 5_000_000_000)),
                      cached_files=("config.json",))
    assert disk.model_download("m", "org/m", 10**9, listed) == disk.Download("m", 5_000_000_000, "the hub's file sizes")
    cached = HubCheck("org/m", "cached")
    assert disk.model_download("m", "org/m", 10**9, cached).bytes == 0
    offline = disk.model_download("q", "Qwen/Qwen2.5-0.5B", 494_032_768, HubCheck("Qwen/Qwen2.5-0.5B", "not-cached"))
    assert offline == disk.Download("q", 494_032_768 * 2, "0.49B parameters in bf16")
    assert disk.model_download("d", "/a/local/dir", 10**9).bytes == 0


def test_a_file_system_without_room_is_named_with_the_figures(tmp_path, monkeypatch):
    cfg = load_config(small_study(tmp_path))
    study = plan_study(cfg, device="cpu", bf16_supported=True)
    plan = disk.plan_disk(cfg, study, {}, hub_cache=tmp_path / "hf")
    needed = plan.total_bytes
    # The cache and the artifacts share this file system: their needs add up.
    assert [size for _, size, _ in plan.needs()] == [needed]
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**12, 10**12 - needed, needed))
    assert plan.shortfalls() == []
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**12, 10**12, needed - 1))
    assert plan.shortfalls() == [
        f"the study needs {disk.size_text(needed)} of disk on the file system of {tmp_path / 'hf'} and "
        f"{tmp_path / 'artifacts'}, which has {disk.size_text(needed - 1)} free"]


def test_run_refuses_to_start_without_the_disk_and_says_how_much(tmp_path, monkeypatch, capsys):
    from flows.cli import main

    config = small_study(tmp_path)
    capsys.readouterr()
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**12, 10**12, 3_000_000))
    assert main(["run", str(config), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ftflow: not enough disk to start (nothing was run): the study needs ")
    assert "which has 3 MB free. Needed:\n  - downloads 0 MB into " in err
    assert "  - kept outputs " in err and "  - checkpoints in flight " in err
    assert f"`ftflow plan {config}` shows every run" in err
    assert not (tmp_path / "artifacts" / "plan_memory").exists()  # nothing ran


@pytest.mark.parametrize("workers", [1, 3])
def test_each_dask_worker_trains_a_run_with_its_own_checkpoints(tmp_path, workers):
    cfg = load_config(small_study(tmp_path))
    study = plan_study(cfg, device="cpu", bf16_supported=True)
    one = disk.plan_disk(cfg, study, {}, hub_cache=tmp_path / "hf").in_flight_bytes
    assert disk.plan_disk(cfg, study, {}, hub_cache=tmp_path / "hf", workers=workers).in_flight_bytes == workers * one


def test_a_runs_disk_is_its_studys_and_a_zoo_config_is_not_planned(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from ftflow.models.hub import HubReport

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    cfg = load_config(small_study(tmp_path))
    study = plan_study(cfg, device="cpu", bf16_supported=True)
    planned = disk.run_disk(cfg, HubReport(), {})
    assert planned == disk.plan_disk(cfg, study, {}, hub_cache=tmp_path / "hf")
    done = [r.title for r in study.runs] + ["teacher_logits[teacher|topk5]"]
    assert disk.run_disk(cfg, HubReport(), {}, done).outputs_bytes == 0  # what is cached needs nothing more
    assert disk.run_disk(load_config("configs/demo.yaml"), HubReport(), {}) is None


def test_the_tokenizer_files_the_hub_listed_and_each_dask_worker_a_run_starts(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from ftflow.models.hub import HubCheck, HubReport

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    cfg = load_config(small_study(tmp_path))
    study = plan_study(cfg, device="cpu", bf16_supported=True)
    alone = disk.study_disk(cfg, HubReport(), study)
    assert alone == disk.plan_disk(cfg, study, {}, hub_cache=tmp_path / "hf")
    # The student's tokenizer files as the hub listed them (the weights are not tokenizer files).
    student = str(tmp_path / "student")
    listed = HubReport({student: HubCheck(student, "ok", files=(("tokenizer.json", 1_000), ("config.json", 500),
                                                                ("model.safetensors", 10**9)))})
    assert disk.study_disk(cfg, listed, study) == disk.plan_disk(cfg, study, listed.checks, hub_cache=tmp_path / "hf",
                                                                 tokenizer_bytes={"student": 1_500})
    # A LocalCluster of 3 workers trains 3 runs at once; a given cluster's size is not known: one is counted.
    dask = cfg.model_copy(update={"runner": cfg.runner.model_copy(update={"kind": "dask", "n_workers": 3})})
    assert disk.study_disk(dask, HubReport(), study).in_flight_bytes == 3 * alone.in_flight_bytes
    given = dask.model_copy(update={"runner": dask.runner.model_copy(update={"address": "tcp://host:8786"})})
    assert disk.study_disk(given, HubReport(), study).in_flight_bytes == alone.in_flight_bytes


def test_a_study_is_refused_before_it_starts_when_a_file_system_lacks_the_disk(tmp_path, monkeypatch):
    from ftflow.errors import UserError

    cfg = load_config(small_study(tmp_path))
    plan = disk.plan_disk(cfg, plan_study(cfg, device="cpu", bf16_supported=True), {}, hub_cache=tmp_path / "hf")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**12, 0, plan.total_bytes))
    disk.refuse_short_disk(plan, "small.yaml")  # just enough
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**12, 10**12, 3_000_000))
    with pytest.raises(disk.NotEnoughDiskError) as caught:
        disk.refuse_short_disk(plan, "small.yaml")
    assert isinstance(caught.value, UserError)  # ftflow run: one "ftflow:" line, exit 2
    assert str(caught.value) == (
        f"not enough disk to start (nothing was run): {plan.shortfalls()[0]}. Needed:\n"
        + "".join(f"  - {line}\n" for line in plan.lines())
        + "  Free space there, or move the downloads (HF_HUB_CACHE) or the outputs (artifacts_dir in small.yaml, "
          "or --set artifacts_dir=DIR) to a larger disk; `ftflow plan small.yaml` shows every run")
    assert "which has 3 MB free" in plan.shortfalls()[0]


def test_halving_keeps_each_intermediate_rungs_state_at_the_seed_configs_shapes(tmp_path):
    """configs/seed-20gb.yaml (successive halving, eta 3, rungs 1/4 and 1/2) planned for its 20 GB GPU: an
    intermediate rung keeps its run's checkpoint and best weights (for a distillation variant the student's full
    weights and optimizer state) while the run may still go on, and only the last rung's survivors keep a final
    output. One run at a time (the local runner), a grid holds at most its second rung's combinations' states and
    the one just finished; on Dask, every state of every rung until the grid ends."""
    from tests.unit.test_cli import _study_config

    path = _study_config(tmp_path)
    halving = load_config(path)
    grid = load_config(path, {"search": {"strategy": "grid"}})
    dask = load_config(path, {"runner": {"kind": "dask"}})
    assert (halving.search.strategy, halving.search.eta, halving.search.rungs) == ("halving", 3, (0.25, 0.5))
    study = plan_study(halving, device="cuda", bf16_supported=True)
    plans = {name: disk.plan_disk(cfg, study, {}, hub_cache=tmp_path / "hf")
             for name, cfg in (("halving", halving), ("grid", grid), ("dask", dask))}
    grids = disk.halving_grids(halving, [r for r in study.runs if r.fit.fits])
    assert sorted(len(g) for g in grids) == [6, 8, 24]  # distillation variants, prefix grid, LoRA grid
    assert disk.halving_grids(grid, study.runs) == []
    states, on_dask, dropped = [], [], 0
    for members in grids:
        # Rung 1/4: every combination; 1/2: ceil(n / 3); the end: ceil(ceil(n / 3) / 3).
        first, second, final = len(members), -(-len(members) // 3), -(-(-(-len(members) // 3)) // 3)
        state = sorted((disk.rung_state_bytes(r.fit) for r in members), reverse=True)
        output = sorted((disk.saved_weight_bytes(r.fit) + disk.TOKENIZER_BYTES for r in members), reverse=True)
        states.append(sum(state[:min(first, second + 1)]))
        on_dask.append(sum(state[:first]) + sum(state[:second]))
        dropped += sum(output[final:])
    distill = next(g for g in grids if g[0].fit.method == "distill")
    # A distillation variant's state: the 2.5B student's weights (twice: the checkpoint's and the best epoch's) and
    # its optimizer state; over 10 GB each at the seed config's bf16 weights and 8-bit AdamW.
    for r in distill:
        weights = r.fit.prediction["parameters"] * 2
        assert disk.rung_state_bytes(r.fit) == 2 * weights + r.fit.prediction["optimizer_bytes"] > 10e9
    # Each grid frees its rung states by the time its last rung has finished: the worst point holds the largest
    # grid's, the distillation variants' (3 of 6: the 2 that go on and the one just finished; on Dask 6 + 2).
    at = [g[0].fit.method for g in grids].index("distill")
    assert max(states) == states[at] and max(on_dask) == on_dask[at]
    assert plans["halving"].outputs_bytes == plans["grid"].outputs_bytes + max(states) - dropped
    assert plans["dask"].outputs_bytes == plans["grid"].outputs_bytes + max(on_dask) - dropped
    assert plans["halving"].outputs_bytes > plans["grid"].outputs_bytes + 3 * 10e9 - dropped
    assert any(d.startswith("3 rung states ") for d in plans["halving"].outputs_detail)
    assert any(d.startswith("8 rung states ") for d in plans["dask"].outputs_detail)
    # What is cached needs nothing: with the variants' first rungs cached, the next grid's states are the worst.
    done = [f"{r.title} @ rung 0.25" for r in distill]
    again = disk.plan_disk(halving, study, {}, hub_cache=tmp_path / "hf", done=done)
    assert again.outputs_bytes == plans["halving"].outputs_bytes - max(states) + max(states[:at] + states[at + 1:])
    # Stratified by loss (search.stratify), each loss's 3 variants keep one survivor: two variants' outputs at the
    # end instead of one, the same rung states (6, then 1 + 1: 3 at once).
    by_loss = load_config(path, {"search": {"stratify": {"distill": ["loss"]}}})
    stratified = disk.plan_disk(by_loss, plan_study(by_loss, device="cuda", bf16_supported=True), {},
                                hub_cache=tmp_path / "hf")
    output = sorted((disk.saved_weight_bytes(r.fit) + disk.TOKENIZER_BYTES for r in distill), reverse=True)
    assert stratified.outputs_bytes == plans["halving"].outputs_bytes + output[1]