"""The end-to-end pipeline: data -> models -> benchmark -> select -> LoRA grid -> other methods -> distill -> report.

Distillation comes last: its teacher is the teacher model's best run of any method.
Every decision (which runs, on which models and training sets) is made in
``ftflow/study/design.py``; this flow only passes each stage's results to the next.
Run it with ``ftflow run [CONFIG]`` or ``python -m flows.pipeline [CONFIG]``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from flows import DEFAULT_CONFIG
from flows.scale import mapped_runner
from flows.steps import (benchmark_candidates, candidates_and_plan, distil, log_family_checks,
                         plan_grid_and_check_it_fits, searcher, trainer)
from ftflow.study import design
from ftflow.stages import calls as stages
from ftflow.plan.budget import use_expandable_segments
from ftflow.config import load_config
from ftflow.models.loading import resolve_device
from tasks._stage import with_storage
from tasks.augment import augment
from tasks.evaluate import evaluate
from tasks.prepare_data import prepare_data
from tasks.publish import publish
from tasks.select_family import select_family


# One task at a time: candidate models are loaded one after another, never side by side in memory.
# Mapped work (benchmarks, training runs) goes where `runner` says: here, or a Dask cluster (flows/scale.py).
@flow(name="ftflow-pipeline", flow_run_name="{config_path}", validate_parameters=False,
      task_runner=ThreadPoolTaskRunner(max_workers=1))
def pipeline(config_path: str = str(DEFAULT_CONFIG), overrides: dict | None = None, progress: bool = True) -> dict:
    """Run every stage of ftflow for one config; returns the evaluation manifest."""
    use_expandable_segments()  # before CUDA starts (the CLI sets it too; a deployment's run starts here)
    logger = get_run_logger()
    cfg = load_config(config_path, overrides)
    out, device = str(cfg.artifacts_dir), resolve_device(cfg.device)
    logger.info("config %s -> artifacts in %s, device %s, mapped work on %s", config_path, out, device,
                cfg.runner.kind)
    stage = lambda task: with_storage(task, out)  # noqa: E731  results live beside the outputs

    # Data, candidate models, and the memory plan: nothing is loaded that it predicts will not fit.
    # Each stage's parameters come from ftflow/stages/calls.py, where `ftflow status` reads them too.
    data = stage(prepare_data)(**stages.prepare_data_call(cfg, out))
    augmented = stage(augment)(**stages.augment_call(cfg.augment, data, out))
    candidates, plan, zoo_checks = candidates_and_plan(cfg, data, device, out, progress)

    with mapped_runner(cfg.runner) as submit:
        # Baselines, and the family (teacher, student) chosen on the selection split.
        benchmarks, failures = benchmark_candidates(submit, candidates, plan, data, cfg, device, out, progress)
        eval_batch = design.evaluation_batch_size(cfg, plan["decisions"], [b["name"] for b in benchmarks])
        family_checks = log_family_checks(benchmarks, zoo_checks)  # each teacher against its student
        selection = stage(select_family)(**stages.select_family_call(cfg, benchmarks, out))
        common = stages.train_common(cfg, data, device, eval_batch, out, progress)
        train_all, search_grid = trainer(submit, augmented, common), searcher(submit, augmented, common, cfg.search)

        # 1. The LoRA grid on the teacher; its best combination (on the selection split) is carried on.
        grid_jobs = design.lora_grid_jobs(cfg, selection)
        plan_grid_and_check_it_fits(cfg, grid_jobs, augmented, data, device, eval_batch)  # said once, before any training
        grid, lora_halving = search_grid("LoRA grid", grid_jobs)  # every combination, or halving's survivors
        best, best_job = design.best_lora(grid)
        logger.info("best LoRA combination: %s (selection PPL %.4f)", best["title"], best["best_validation_ppl"])

        # 2. Per compared model: LoRA with that combination, QLoRA, full fine-tuning; the prefix grid.
        for line in design.left_out_of_full_fine_tuning(cfg, benchmarks, selection):
            logger.info(line)
        per_model = train_all(design.per_model_jobs(cfg, benchmarks, selection, best_job, include_prefix=False))
        prefix, prefix_halving = search_grid("prefix grid", design.prefix_grid_jobs(cfg, selection))
        per_model += prefix

        # 3. Distillation from the teacher's best run (any method), whenever the tokenizers allow it; its targets
        #    stored once per variant at the largest k; the full fine-tune at equal steps beside it measures it.
        choice, distilled, distil_halving = distil(cfg, train_all, search_grid, selection, grid + per_model,
                                                   benchmarks, augmented, device, out, progress)

        # 4. The measured effect of augmentation: one run repeated on each training set.
        ablation, made = design.ablation_runs(cfg, selection, best_job), {"main": augmented, "original": data}
        train_sets = [made.get(r.train_set.source) or stage(augment).with_options(task_run_name=r.train_set.run_name)(
            **stages.augment_call(r.train_set.augment, data, out)) for r in ablation]
        ablation_results = train_all([r.job for r in ablation], train_sets) if ablation else []

    # The report: every baseline and run once, ranked on test.
    runs = design.unique_runs(grid + per_model + distilled + ablation_results)
    evaluation = stage(evaluate)(**stages.evaluate_call(
        cfg, data, augmented, benchmarks, failures, selection, runs, best["name"], design.ablation_labels(ablation),
        out, teacher=choice.model_dump(mode="json"), checks=family_checks, decisions=plan["decisions"],
        halving=[h for h in (lora_halving, prefix_halving, distil_halving) if h is not None]))
    publish(evaluation, plan, benchmarks)
    logger.info("report: %s", Path(evaluation["dir"]) / evaluation["files"]["report"])
    # Runs and models without a result do not stop the run; its log's last lines say which and why.
    if failed := [row for row in evaluation["leaderboard"] if row.get("error")]:
        logger.warning("%d model(s) or run(s) have no result:\n  %s", len(failed),
                       "\n  ".join(f"{row['name']} ({row['kind']}): {row['error']}" for row in failed))
    return evaluation


if __name__ == "__main__":
    from flows.cli import main

    sys.exit(main(["run", *sys.argv[1:]]))
