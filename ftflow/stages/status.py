"""What a run of the pipeline would do, before it runs: every stage cached, or to run and why (``ftflow status``).

The walk follows the pipeline's order and makes the pipeline's decisions with
the same functions (:mod:`ftflow.study.design` for which runs exist, :mod:`ftflow.stages.calls`
for each task's parameters, :func:`ftflow.stages.caching.key_and_parts` for the key), so
it computes exactly the keys a run would, from the config and the manifests
already on disk; nothing is loaded and Prefect is not involved.

A stage is *cached* when ``artifacts/<stage>/<key>/`` holds outputs that verify
(:func:`ftflow.artifacts.check_outputs`) and Prefect's record. Otherwise it *will
run*, and the reason is found by comparing the parts of its key
(:func:`ftflow.stages.caching.key_parts`, which each manifest records) with those of
the closest earlier run of that stage on disk (fewest differing parts, then the
most recent): a config field or parameter, an input file's content, an upstream
stage's result, a module's source, a library version. A stage whose inputs come
from a stage that will run is *after* that stage: its key is not known before
then, and where the jobs themselves depend on upstream results (the LoRA grid's
best combination decides the per-model runs and the teacher), only the group
is listed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from ftflow.artifacts import MANIFEST, check_outputs, hash_all_from_env
from ftflow.config import PipelineConfig
from ftflow.errors import UserError
from ftflow.stages import calls as stages
from ftflow.stages.caching import PREFECT_RECORD
from ftflow.study import design

PENDING = "pending"  # marks the placeholder of a stage that will run: {"stage", "fingerprint": None, PENDING: label}
MAX_REASONS = 6  # per stage; the rest are counted


@dataclass
class StageStatus:
    """One stage run of the pipeline as the next run will find it."""

    stage: str
    label: str  # the task run's name (``benchmark[granite-student|fp32]``, a job's title) or a group of runs
    state: Literal["cached", "run", "after"]
    key: Optional[str] = None
    directory: Optional[Path] = None
    reasons: list[str] = field(default_factory=list)
    after: list[str] = field(default_factory=list)  # labels of the stages that must run first


@dataclass
class PipelineStatus:
    """Every stage run of the pipeline, in order, and the evaluation manifest when it is cached."""

    artifacts_dir: Path
    stages: list[StageStatus]
    evaluation: Optional[dict] = None

    @property
    def nothing_to_run(self) -> bool:
        """Whether every stage is cached, the report included: a run would compute nothing."""
        return self.evaluation is not None and all(s.state == "cached" for s in self.stages)

    @property
    def cached_labels(self) -> list[str]:
        """Labels of the stage runs a run would find cached (no disk needed for them: ``ftflow.plan.disk.run_disk``)."""
        return [s.label for s in self.stages if s.state == "cached"]

    def counts(self) -> dict[str, int]:
        return {state: sum(s.state == state for s in self.stages) for state in ("cached", "run", "after")}

    def to_text(self) -> str:
        """One line per stage run (and one per reason), then a summary line."""
        lines = []
        width = min(48, max((len(s.label) for s in self.stages), default=10))
        for s in self.stages:
            if s.state == "cached":
                lines.append(f"cached    {s.label:<{width}}  {_shown(s.directory)}")
                continue
            head = "will run " if s.state == "run" else "after    "
            lines.append(f"{head} {s.label:<{width}}" + (f"  after {', '.join(_few(s.after))}" if s.after else ""))
            lines += [f"              - {reason}" for reason in s.reasons]
        counts = self.counts()
        if self.nothing_to_run:
            lines.append(f"nothing to run: all {counts['cached']} stage runs are cached")
        else:
            lines.append(f"{counts['run']} stage run(s) will run, {counts['after']} after them, "
                         f"{counts['cached']} cached")
        return "\n".join(lines)


def _shown(path: Optional[Path]) -> str:
    if path is None:
        return ""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _few(labels: list[str], most: int = 3) -> list[str]:
    return labels if len(labels) <= most else labels[:most] + [f"{len(labels) - most} more"]


def _pending(stage: str, label: str) -> dict:
    return {"stage": stage, "fingerprint": None, PENDING: label}


def is_pending(value: Any) -> bool:
    """Whether ``value`` stands for the result of a stage that will run (not on disk yet)."""
    return isinstance(value, dict) and PENDING in value


def pending_labels(*values: Any) -> list[str]:
    """The labels of the stages that will run among ``values``: placeholders, lists of them, a call's parameters."""
    labels: list[str] = []

    def visit(value: Any, depth: int) -> None:
        if is_pending(value):
            if value[PENDING] not in labels:
                labels.append(value[PENDING])
        elif isinstance(value, (list, tuple)) and depth < 2:
            for item in value:
                visit(item, depth + 1)
        elif isinstance(value, dict) and depth == 0 and "stage" not in value:  # a call's parameters
            for item in value.values():
                visit(item, depth + 1)

    for value in values:
        visit(value, 0)
    return labels


# ----------------------------------------------------------------------------- explaining a changed key


def explain_changes(old: dict, new: dict) -> list[str]:
    """What differs between two stage keys' parts (:func:`ftflow.stages.caching.key_parts`), one line per part.

    Upstream stages that will run (fingerprint not known yet) are left out: the caller says "after" them.
    """
    lines = []
    old_inputs, new_inputs = old.get("inputs", {}), new.get("inputs", {})
    for path in sorted(set(old_inputs) | set(new_inputs), key=lambda p: (p.split(".")[0], p)):
        before, now = old_inputs.get(path), new_inputs.get(path)
        if before == now:
            continue
        if now is not None and now["kind"] == "upstream" and now["fingerprint"] is None:
            continue
        if before is None:
            lines.append(f"{path}: a new input (config field or parameter)")
        elif now is None:
            lines.append(f"{path}: no longer an input")
        elif now["kind"] == "upstream":
            lines.append(f"upstream {now['stage']} ({path}) is another result: "
                         f"{before.get('fingerprint')} -> {now['fingerprint']}")
        elif now["kind"] == "file":
            lines.append(f"{path}: the file's content changed")
        else:
            lines.append(f"{path} changed (config field or parameter)")
    old_code, new_code = old.get("code", {}), new.get("code", {})
    for module in sorted(set(old_code) | set(new_code)):
        if old_code.get(module) == new_code.get(module):
            continue
        if module not in old_code:
            lines.append(f"code: now reaches {module}")
        elif module not in new_code:
            lines.append(f"code: no longer reaches {module}")
        else:
            lines.append(f"code of {module} changed")
    old_libraries, new_libraries = old.get("libraries", {}), new.get("libraries", {})
    for name in sorted(set(old_libraries) | set(new_libraries)):
        if old_libraries.get(name) != new_libraries.get(name):
            lines.append(f"library {name} {old_libraries.get(name, 'absent')} -> {new_libraries.get(name, 'absent')}")
    return lines


def _difference(old: dict, new: dict) -> int:
    """How many parts two keys' parts differ in (to find the closest earlier run)."""
    count = 0
    for section in ("inputs", "code", "libraries"):
        a, b = old.get(section, {}), new.get(section, {})
        count += sum(a.get(k) != b.get(k) for k in set(a) | set(b))
    return count


# ----------------------------------------------------------------------------- the walk


class _Walk:
    """Looks each stage run up on disk, records its status, and hands on its manifest or a placeholder."""

    def __init__(self, artifacts_dir: Path):
        self.root = artifacts_dir
        self.entries: list[StageStatus] = []
        self.results: dict[tuple[str, str], dict] = {}
        self.hash_all = hash_all_from_env()
        self._earlier: dict[str, list[tuple[float, Path, dict]]] = {}

    def stage(self, stage: str, label: str, call: dict) -> dict:
        key, parts = stages.key_of(stage, call)
        after = pending_labels(call)
        if after:  # the key depends on a result not computed yet
            self.entries.append(StageStatus(stage, label, "after", reasons=self._explain(stage, key, parts),
                                            after=after))
            return _pending(stage, label)
        if (stage, key) in self.results:  # submitted twice in one run (the ablation's main run): once
            return self.results[(stage, key)]
        final = self.root / stage / key
        manifest, problem = check_outputs(final, {"stage": stage, "key": key}, hash_all=self.hash_all)
        if manifest is not None and (final / PREFECT_RECORD).is_file():
            self.entries.append(StageStatus(stage, label, "cached", key=key, directory=final))
            self.results[(stage, key)] = manifest
            return manifest
        if manifest is not None:  # finished, but its run died before Prefect's record: the run reuses them
            reasons = [f"its outputs are in {final} without Prefect's cache record: the run reuses them"]
            result = manifest
        elif final.exists():
            reasons = [f"its outputs in {final} failed verification ({problem}): the run moves them aside and "
                       "computes it again"]
            result = _pending(stage, label)
        else:
            reasons = self._explain(stage, key, parts)
            result = _pending(stage, label)
        self.entries.append(StageStatus(stage, label, "run", key=key, directory=final, reasons=reasons))
        self.results[(stage, key)] = result
        return result

    def later(self, stage: str, label: str, after: list[str]) -> dict:
        """A stage (or group of runs) that cannot even be listed until ``after`` has run."""
        self.entries.append(StageStatus(stage, label, "after", after=list(after)))
        return _pending(stage, label)

    def _explain(self, stage: str, key: str, parts: dict) -> list[str]:
        earlier = [e for e in self._earlier_runs(stage) if e[1].name != key]
        if not earlier:
            return [f"not on disk (never computed for these inputs, or its directory was deleted); no other run of "
                    f"{stage} in {_shown(self.root / stage)} to compare with"]
        mtime, directory, manifest = min(earlier, key=lambda e: (_difference(e[2]["key_parts"], parts), -e[0]))
        changes = explain_changes(manifest["key_parts"], parts)
        if len(changes) > MAX_REASONS:
            changes = changes[:MAX_REASONS] + [f"... and {len(changes) - MAX_REASONS} more"]
        name = manifest.get("title") or manifest.get("name") or stage
        return changes + [f"(against the closest earlier run: {name}, {_shown(directory)})"] if changes else []

    def _earlier_runs(self, stage: str) -> list[tuple[float, Path, dict]]:
        if stage not in self._earlier:
            found = []
            directory = self.root / stage
            for path in sorted(directory.iterdir()) if directory.is_dir() else []:
                manifest_path = path / MANIFEST
                if path.name.startswith(".") or not manifest_path.is_file():
                    continue
                try:
                    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    continue
                if isinstance(manifest, dict) and isinstance(manifest.get("key_parts"), dict):
                    found.append((manifest_path.stat().st_mtime, path, manifest))
            self._earlier[stage] = found
        return self._earlier[stage]


def pipeline_status(cfg: PipelineConfig, device: Optional[str] = None) -> PipelineStatus:
    """Every stage run the pipeline would make for ``cfg``, in its order: cached, will run (why), or after which.

    Args:
        cfg: the validated config (overrides applied), as the pipeline loads it.
        device: where the run would train; None: ``cfg.device`` resolved as the pipeline resolves it.
    """
    if device is None and cfg.device == "cpu":
        device = "cpu"
    elif device is None:
        # torch (is a GPU visible?), not Prefect: the pipeline's device
        from ftflow.models.loading import resolve_device

        device = resolve_device(cfg.device)
    out = str(cfg.artifacts_dir)
    w = _Walk(Path(out).resolve())
    progress = True  # not in any key

    data = w.stage("prepare_data", "prepare_data", stages.prepare_data_call(cfg, out))
    augmented = w.stage("augment", "augment", stages.augment_call(cfg.augment, data, out))
    zoo_checks: list[str] = []
    if cfg.zoo is not None:
        zoo = (w.later("zoo", "zoo", pending_labels(data)) if is_pending(data) else
               w.stage("zoo", "zoo", stages.zoo_call(cfg, data, device, out, progress)))
        candidates = None if is_pending(zoo) else stages.zoo_candidates(zoo)
        zoo_checks = [] if is_pending(zoo) else design.zoo_teacher_checks(zoo)
    else:
        candidates = list(cfg.models)
    problems: dict[str, str] = {}
    if candidates is not None:  # the hub ids the hub refuses (or, offline, the cache lacks) are not planned
        from ftflow.models.hub import check_candidates

        problems = check_candidates(candidates)[1]
    plan = (w.later("plan_memory", "plan_memory", ["zoo"]) if candidates is None else
            w.stage("plan_memory", "plan_memory", stages.plan_memory_call(
                cfg, [c for c in candidates if c.name not in problems], data, device, out)))
    if is_pending(plan):
        return _rest(w, [plan[PENDING]], benchmarks=True)
    plan = design.with_unavailable(plan, candidates, problems)

    planned, failures = design.benchmark_plan(candidates, plan["decisions"])
    benchmarks = [w.stage("benchmark", f"benchmark[{spec.name}|{spec.precision}]",
                          stages.benchmark_call(cfg, spec, batch_size, data, device, out, progress))
                  for spec, batch_size in planned]
    if after := pending_labels(benchmarks):
        return _rest(w, after, select=True)
    selection = w.stage("select_family", "select_family", stages.select_family_call(cfg, benchmarks, out))
    if is_pending(selection):
        return _rest(w, ["select_family"])

    common = stages.train_common(cfg, data, device, design.evaluation_batch_size(
        cfg, plan["decisions"], [b["name"] for b in benchmarks]), out, progress)

    def train(job, train_set=augmented, topk=None) -> dict:
        return w.stage("train", job.title, stages.train_call(common, job, train_set, topk))

    def search(name: str, jobs: list, topks: Optional[list] = None) -> tuple[list[dict], Optional[dict]]:
        """A grid as the pipeline searches it (flows/steps.py::searcher): every run, or rung after rung."""
        topks = topks or [None] * len(jobs)
        if cfg.search.strategy == "grid" or len(jobs) < 2:
            return [train(job, augmented, topk) for job, topk in zip(jobs, topks)], None
        from ftflow.study import halving

        alive, previous, rungs = list(range(len(jobs))), [None] * len(jobs), []
        for fraction in halving.rung_fractions(cfg.search.rungs):
            results = [w.stage("train", stages.rung_title(jobs[i], fraction), stages.train_call(
                common, jobs[i], augmented, topks[i], rung=stages.rung_of(fraction, previous[i]))) for i in alive]
            for i, result in zip(alive, results):
                previous[i] = result
            rungs.append(results)
            if after := pending_labels(results):
                if fraction < 1:  # who goes on is known once the rung has run
                    return [w.later("train", f"{name}: the rungs after {fraction:g} (its survivors)", after)], None
                return results, None
            if fraction < 1:
                kept = set(halving.rung_survivors(results, cfg.search.eta, cfg.search.axes(jobs[0].method)))
                alive = [i for i in alive if jobs[i].name in kept]
        return rungs[-1], halving.grid_summary(name, rungs, cfg.search.eta, cfg.search.axes(jobs[0].method))

    grid, lora_halving = search("LoRA grid", design.lora_grid_jobs(cfg, selection))
    if after := pending_labels(grid):  # the best combination decides the next runs and the teacher
        w.later("train", "per-model runs (LoRA with the best combination, QLoRA, full, prefix grid)", after)
        w.later("teacher_logits", "teacher_logits (of the teacher's best run)", after)
        distilled = [w.later("train", "distillation runs and the student's full fine-tune at equal steps", after)]
        if cfg.ablation.enabled:
            w.later("train", "augmentation ablation runs", after)
        w.later("evaluate", "evaluate", pending_labels(grid, distilled))
        return PipelineStatus(w.root, w.entries)
    best, best_job = design.best_lora(grid)
    per_model = [train(job) for job in design.per_model_jobs(cfg, benchmarks, selection, best_job,
                                                             include_prefix=False)]
    prefix, prefix_halving = search("prefix grid", design.prefix_grid_jobs(cfg, selection))
    per_model += prefix
    family_checks = design.family_teacher_check(benchmarks, "validation")
    choice, distilled, distil_halving = None, [], None
    if after := pending_labels(per_model):  # the teacher is the best of the teacher's runs, against the student's
        w.later("teacher_logits", "teacher_logits (of the teacher's best run)", after)
        distilled = [w.later("train", "distillation runs and the student's full fine-tune at equal steps", after)]
    else:
        # tokenizer files and configs, as the pipeline reads them
        from ftflow.distill.vocabulary import distillation_problem

        choice = design.distillation_teacher(cfg, selection, grid + per_model, benchmarks, distillation_problem(
            selection["teacher_model"], selection["student_model"]))
        if choice.distil:
            distilled = [train(design.distillation_reference(cfg, selection))]
            jobs, topks = [], []
            for variant in design.distillation_variants(cfg):
                targets = w.stage("teacher_logits",
                                  f"teacher_logits[{choice.teacher['name']}|{variant}{max(cfg.distill.top_k)}]",
                                  stages.teacher_logits_call(cfg, choice.teacher, design.distillation_student(selection),
                                                             augmented, device, out, progress, variant))
                variant_jobs = design.distillation_jobs(cfg, selection, variant)
                jobs += variant_jobs
                topks += [targets] * len(variant_jobs)
            variants, distil_halving = search("distillation variants", jobs, topks)
            distilled += variants
    ablation, made = design.ablation_runs(cfg, selection, best_job), {"main": augmented, "original": data}
    train_sets = [made.get(r.train_set.source) or w.stage("augment", r.train_set.run_name,
                                                          stages.augment_call(r.train_set.augment, data, out))
                  for r in ablation]
    ablation_results = [train(r.job, train_set) for r, train_set in zip(ablation, train_sets)]
    everything = grid + per_model + distilled + ablation_results
    if after := pending_labels(everything):
        w.later("evaluate", "evaluate", after)
        return PipelineStatus(w.root, w.entries)
    evaluation = w.stage("evaluate", "evaluate", stages.evaluate_call(
        cfg, data, augmented, benchmarks, failures, selection, design.unique_runs(everything), best["name"],
        design.ablation_labels(ablation), out, teacher=choice.model_dump(mode="json"),
        checks=design.teacher_check_notes(zoo_checks, family_checks), decisions=plan["decisions"],
        halving=[h for h in (lora_halving, prefix_halving, distil_halving) if h is not None]))
    return PipelineStatus(w.root, w.entries, None if is_pending(evaluation) else evaluation)


def _rest(w: _Walk, after: list[str], *, benchmarks: bool = False, select: bool = False) -> PipelineStatus:
    """The stages after one whose result decides what they are: listed as groups, after it."""
    groups = []
    if benchmarks:
        groups.append(("benchmark", "benchmark (every candidate the memory plan lets through)"))
    if benchmarks or select:
        groups.append(("select_family", "select_family"))
    groups += [("train", "training runs (LoRA grid, per-model runs, distillation, ablation)"),
               ("teacher_logits", "teacher_logits"), ("evaluate", "evaluate")]
    for stage, label in groups:
        w.later(stage, label, after)
    return PipelineStatus(w.root, w.entries)


def status_text(source: str, status: PipelineStatus) -> str:
    """The ``ftflow status`` report: a heading, then :meth:`PipelineStatus.to_text`."""
    return f"ftflow status: {source} (artifacts in {_shown(status.artifacts_dir)})\n{status.to_text()}\n"


class NoFinishedRunError(UserError):
    """A command that reads a finished run's results (``ftflow export``) on a config whose run has not finished."""


def finished_evaluation(cfg: PipelineConfig, source: str) -> dict:
    """The evaluation manifest of ``cfg``'s finished run (its report, leaderboard and recommendation).

    Args:
        cfg: the config.
        source: the config file as the user named it (for the commands the error gives).

    Raises:
        NoFinishedRunError: the run has not finished (its report is not in the artifacts directory).
    """
    status = pipeline_status(cfg)
    if status.evaluation is None:
        raise NoFinishedRunError(
            f"{source} has no finished run in {cfg.artifacts_dir} (its report is not there for this config): run it "
            f"first, `ftflow run {source}`; `ftflow status {source}` says what is left")
    return status.evaluation
