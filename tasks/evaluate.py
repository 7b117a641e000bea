"""Stage 9: test perplexity of every candidate -> leaderboard, report and plots."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from ftflow.data import read_split
from ftflow.models import load_model, load_tokenizer
from ftflow.perplexity import score_sentences
from ftflow.report import leaderboard_rows, markdown_table, plot_leaderboard, plot_training, render_report
from tasks._stage import STAGE_TASK_OPTIONS, ContentCache, run_logger, run_stage, stage_path

STAGE = "evaluate"
MODULES = ("ftflow.report", "ftflow.perplexity", "ftflow.models", "ftflow.tokens", "ftflow.data", "tasks.evaluate")


def _trained_candidates(teacher: dict, distilled: dict, finetuned: dict) -> list[tuple[str, dict, dict]]:
    """(kind, manifest, how to load it) for every trained model."""
    base = teacher["base_model"]
    return [
        ("teacher+lora", teacher, dict(path=base["path"], precision=base["precision"],
                                       adapter=str(stage_path(teacher, "adapter")))),
        ("distilled", distilled, dict(path=str(stage_path(distilled, "model")),
                                      precision=distilled["base_model"]["precision"])),
        ("full-finetune", finetuned, dict(path=str(stage_path(finetuned, "model")),
                                          precision=finetuned["base_model"]["precision"])),
    ]


@task(name="evaluate", cache_policy=ContentCache(stage=STAGE, modules=MODULES), **STAGE_TASK_OPTIONS)
def evaluate(data: dict, augmented: dict, benchmarks: list[dict], failures: list[dict], selection: dict,
             teacher: dict, distilled: dict, finetuned: dict, title: str, batch_size: int, max_length: int,
             device: str, selection_split: str, memory_budget_gb: float, artifacts_dir: str,
             progress: bool = True) -> dict:
    """Score the trained models on test, rank everything, write the leaderboard and the report."""

    def build(out: Path) -> dict:
        logger = run_logger()
        test = read_split(stage_path(data, "test"))
        candidates = [
            {"name": b["name"], "kind": "baseline", "family": b["family"], "base": b["name"],
             "parameters": b["parameters"], "precision": b["precision"], "test": b["test"],
             "selection": b[selection_split], "peak_memory_bytes": b.get("peak_memory_bytes")}
            for b in benchmarks
        ]
        candidates += [{"name": f["name"], "kind": "baseline", "family": f.get("family"),
                        "precision": f.get("precision"), "error": f["error"]} for f in failures]
        histories = {}
        for kind, manifest, how in _trained_candidates(teacher, distilled, finetuned):
            base = manifest["base_model"]
            tokenizer = load_tokenizer(base["path"], base["trust_remote_code"])
            model = load_model(how["path"], how["precision"], device, adapter=how.get("adapter"),
                               trust_remote_code=base["trust_remote_code"])
            result = score_sentences(model, tokenizer, test, batch_size=batch_size, max_length=max_length,
                                     progress=progress, desc=f"{manifest['name']} test")
            logger.info("%s test: PPL %.4f, bits/byte %.4f", manifest["name"], result.corpus_ppl, result.bits_per_byte)
            candidates.append({
                "name": manifest["name"], "kind": kind, "family": selection["family"], "base": base["name"],
                "parameters": next(b["parameters"] for b in benchmarks if b["name"] == base["name"]),
                "precision": base["precision"], "test": result.to_dict(),
                "selection": next(e["validation"] for e in manifest["history"] if e["epoch"] == manifest["best_epoch"]),
            })
            histories[manifest["name"]] = manifest
        frame = leaderboard_rows(candidates)
        frame.to_csv(out / "leaderboard.csv", index=False)
        (out / "leaderboard.md").write_text(markdown_table(frame) + "\n", encoding="utf-8")
        plot_leaderboard(frame, out / "leaderboard.png")
        plot_training(histories, out / "training.png")
        protocol = ("selection on the validation split held out of train; test used only for this report"
                    if selection_split == "validation" else
                    "STUDY PROTOCOL: best epochs and the family were chosen on the TEST split, so test "
                    "perplexities are optimistic")
        data_stats = dict(data["stats"], augmented=augmented["stats"].get("made", 0))
        notes = [f"{f['name']} failed and was left out: {f['error']}" for f in failures]
        for b in benchmarks:
            if b.get("peak_memory_bytes") and b["peak_memory_bytes"] > memory_budget_gb * 1e9:
                notes.append(f"{b['name']} peaked at {b['peak_memory_bytes'] / 1e9:.1f} GB while scoring, over "
                             f"the {memory_budget_gb:g} GB budget")
        truncated = int(frame["test_truncated"].fillna(0).sum())
        if truncated:
            notes.append(f"{truncated} test sentence(s) were truncated at {max_length} tokens across all rows")
        report = render_report(title=title, frame=frame, data_stats=data_stats, selection=selection,
                               protocol_note=protocol, images=["leaderboard.png", "training.png"], notes=notes)
        (out / "report.md").write_text(report, encoding="utf-8")
        return {
            "files": {"leaderboard_csv": "leaderboard.csv", "leaderboard_md": "leaderboard.md",
                      "report": "report.md", "plot": "leaderboard.png", "training_plot": "training.png"},
            "leaderboard": frame.astype(object).where(frame.notna(), None).to_dict("records"),
        }

    return run_stage(STAGE, MODULES, build)
