"""The disk a study needs before it starts: model downloads, the outputs it keeps, the checkpoints of the run training.

A study of hub models downloads every benchmarked model (about 95 GB for the 12 of ``configs/seed-20gb.yaml``)
into the Hugging Face cache, and writes its results under ``artifacts_dir``. ``ftflow plan`` prints what it
needs; ``ftflow run`` refuses to start when a file system lacks it, with the figures. The parts:

* downloads (into :func:`ftflow.models.hub.hub_cache_dir`): each benchmarked hub model not complete in the cache yet; its
  size from the hub's file list when online (what ``from_pretrained`` fetches: root-level safetensors, else
  ``.bin``, and the tokenizer's files), else its parameter count at the dtype its weights have on the hub
  (:data:`ftflow.models.known.HUB_DTYPES`);
* kept outputs (under ``artifacts_dir``): each training run's best epoch (an adapter in fp32, or a full checkpoint
  at the precision it trained in) with the tokenizer's files, and the teacher's stored targets (per position and
  id an int32 id and an fp16 log-probability, plus an fp32 tail for top-k);
* checkpoints in flight: the run training keeps its last Trainer checkpoint (trained weights and optimizer state,
  :func:`checkpoint_bytes`) and writes the next one before deleting it (``save_total_limit=1``), so two at once,
  for the largest run; one run trains at a time per worker;
* under ``search.strategy: halving`` (docs/halving.md), an intermediate rung keeps its run's state (its
  checkpoint and the best epoch's weights so far, :func:`rung_state_bytes`) until the run can no longer go on or
  its next rung has finished (``flows/steps.py::searcher``), and only the last rung's survivors keep a final
  output. With ``m_k`` combinations reaching rung ``k`` (summed over the strata of ``search.stratify``), one run
  at a time keeps at most ``min(m_1, m_2 + 1)`` states (each combination alive holds one, and the run just
  finished its own and its previous rung's until the flow sees it); on Dask the flow sees the runs in order, not
  as they finish, so the plan counts every rung's ``m_k`` states, as if none were freed before the grid ends.
  Per grid the largest such states and the largest survivors' outputs, since who survives is not known before
  the run; the grids run one after another, so the worst point holds the states of one grid.

Runs and teacher passes already cached need nothing (``done``). Figures are decimal GB (10**9 bytes).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Collection, Mapping, Optional

from ftflow.errors import UserError
from ftflow.models.known import HUB_DTYPES, known_id
from ftflow.plan.predict import GB
from ftflow.study.halving import reaching, rung_fractions, rung_label

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
TOKENIZER_BYTES = 12_000_000
"""The tokenizer files each kept run saves beside its weights, when the hub did not list them: Qwen2.5's are 11.4 MB
(tokenizer.json 7.0, vocab.json 2.8, merges.txt 1.7), Llama 3's 9.1, Granite's 3.5."""
CHECKPOINTS_AT_ONCE = 2
"""The Trainer writes a checkpoint before it deletes the one before (``save_total_limit=1``)."""


@dataclass(frozen=True)
class Download:
    """One model's download: bytes still to fetch, and how that was found."""

    name: str
    bytes: int
    how: str


@dataclass
class DiskPlan:
    """The disk a study needs, by part, and where each part goes.

    Attributes:
        downloads: per benchmarked model (once per hub id, named by it).
        outputs_bytes: the runs' kept outputs and the teacher stores (under ``artifacts_dir``).
        outputs_detail: the parts of ``outputs_bytes``, one phrase each.
        in_flight_bytes: the largest run's checkpoints while it trains (under ``artifacts_dir``).
        hub_cache: where downloads go.
        artifacts_dir: where outputs go.
        notes: what was estimated.
    """

    downloads: list[Download]
    outputs_bytes: int
    outputs_detail: list[str]
    in_flight_bytes: int
    hub_cache: Path
    artifacts_dir: Path
    notes: list[str] = field(default_factory=list)

    @property
    def download_bytes(self) -> int:
        return sum(d.bytes for d in self.downloads)

    @property
    def total_bytes(self) -> int:
        return self.download_bytes + self.outputs_bytes + self.in_flight_bytes

    def needs(self) -> list[tuple[Path, int, list[Path]]]:
        """``(a folder on each file system, bytes it needs, the folders counted)``: downloads and outputs on the
        same file system are added up."""
        parts = [(self.hub_cache, self.download_bytes), (self.artifacts_dir, self.outputs_bytes + self.in_flight_bytes)]
        by_device: dict[int, tuple[Path, int, list[Path]]] = {}
        for folder, size in parts:
            device = os.stat(existing_parent(folder)).st_dev
            first, total, folders = by_device.get(device, (folder, 0, []))
            by_device[device] = (first, total + size, folders + [folder])
        return list(by_device.values())

    def shortfalls(self) -> list[str]:
        """One line per file system with less free space than the study needs there (none: it fits)."""
        lines = []
        for folder, size, folders in self.needs():
            free = free_bytes(folder)
            if size > free:
                where = " and ".join(str(f) for f in folders)
                lines.append(f"the study needs {size_text(size)} of disk on the file system of {where}, which has "
                             f"{size_text(free)} free")
        return lines

    def lines(self) -> list[str]:
        """The figures, one line per part, for ``ftflow plan`` and the run's refusal."""
        fetched = [d for d in self.downloads if d.bytes]
        lines = [f"downloads {size_text(self.download_bytes)} into {self.hub_cache} (HF_HUB_CACHE): "
                 + (", ".join(f"{d.name} {size_text(d.bytes)} ({d.how})" for d in fetched) or "nothing")
                 + (f"; {len(self.downloads) - len(fetched)} model(s) already in the cache"
                    if len(fetched) < len(self.downloads) else ""),
                 f"kept outputs {size_text(self.outputs_bytes)} in {self.artifacts_dir}: "
                 + ("; ".join(self.outputs_detail) or "nothing new"),
                 f"checkpoints in flight {size_text(self.in_flight_bytes)} in {self.artifacts_dir} (the largest run's "
                 f"last checkpoint and the next, {CHECKPOINTS_AT_ONCE} at once)"]
        return lines + self.notes


def size_text(n_bytes: int) -> str:
    """``12.3 GB``, or ``45 MB`` under a GB (decimal units)."""
    return f"{n_bytes / GB:.1f} GB" if n_bytes >= GB else f"{n_bytes / 1e6:.0f} MB"


def existing_parent(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists (where its files will land)."""
    path = Path(path).expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: Path) -> int:
    """Free bytes on the file system that holds (or will hold) ``path``, for this user."""
    return shutil.disk_usage(existing_parent(path)).free


def model_download(name: str, path: str, parameters: Optional[int], check=None) -> Download:
    """What loading one model downloads: nothing for a local directory or a model complete in the cache; the hub's
    listed files not cached yet (``check``: its :class:`ftflow.models.hub.HubCheck`); else its parameters at the dtype
    of its weights on the hub (bf16 unless :data:`ftflow.models.known.HUB_DTYPES` says otherwise)."""
    from ftflow.models.hub import is_hub_id

    if not is_hub_id(path):
        return Download(name, 0, "local directory")
    if check is not None and check.kind == "cached":
        return Download(name, 0, "in the cache")
    listed = None if check is None else check.download_bytes()
    if listed is not None:
        return Download(name, listed, "the hub's file sizes")
    if parameters is None:
        return Download(name, 0, "size unknown")
    dtype = HUB_DTYPES.get(known_id(path) or "", "bf16")
    return Download(name, parameters * DTYPE_BYTES[dtype], f"{parameters / 1e9:.2f}B parameters in {dtype}")


def saved_weight_bytes(fit) -> int:
    """Bytes of one run's kept weights: adapters in fp32 (PEFT keeps them so), a full checkpoint at the precision
    it trained in (fp32 master weights are saved in fp32)."""
    prediction = fit.prediction
    if fit.method in ("full", "distill"):
        trained = "fp32" if fit.master_weights == "fp32" else fit.train_precision
        return prediction["parameters"] * DTYPE_BYTES.get(trained, 2)
    return prediction["trainable_parameters"] * 4


def checkpoint_bytes(fit) -> int:
    """One Trainer checkpoint of a run: its trained weights (as saved) and its optimizer state."""
    return saved_weight_bytes(fit) + fit.prediction["optimizer_bytes"]


def rung_state_bytes(fit) -> int:
    """What an intermediate rung of successive halving keeps (``state/``): the run's last checkpoint and its best
    epoch's weights so far (kept beside it, ``best/``)."""
    return checkpoint_bytes(fit) + saved_weight_bytes(fit)


def halving_grids(cfg, runs) -> list[list]:
    """The grids successive halving searches among ``runs`` (each a list of two runs or more); none under grid
    search. The grouping of :func:`ftflow.plan.study.search_compute`: by section, for the searched sections."""
    from ftflow.plan.study import SEARCHED_SECTIONS

    if cfg.search.strategy != "halving":
        return []
    groups: dict[str, list] = {}
    for run in runs:
        if run.section in SEARCHED_SECTIONS:
            groups.setdefault(run.section, []).append(run)
    return [members for members in groups.values() if len(members) >= 2]


def teacher_store_bytes(positions: int, k: int, variant: str) -> int:
    """The teacher's stored targets over ``positions`` training tokens: ``k`` int32 ids and fp16 log-probs each,
    and (top-k) an fp32 tail log-mass."""
    return positions * k * 6 + (positions * 4 if variant == "topk" else 0)


def plan_disk(cfg, study, checks: Mapping[str, object], *, hub_cache: Path, done: Collection[str] = (),
              tokenizer_bytes: Optional[Mapping[str, int]] = None, workers: int = 1) -> DiskPlan:
    """The disk ``cfg``'s study needs (see the module's docstring).

    Args:
        cfg: the :class:`ftflow.config.PipelineConfig`.
        study: its :class:`ftflow.plan.study.StudyPlan` (the benchmarked models, the training runs, token counts).
        checks: the hub check per model id (:class:`ftflow.models.hub.HubCheck`; absent: not asked).
        hub_cache: where downloads go (:func:`ftflow.models.hub.hub_cache_dir`).
        done: titles of training runs and labels of teacher passes already cached (``ftflow status``).
        tokenizer_bytes: the tokenizer files' size per model name, where the hub listed them.
        workers: runs training at once (Dask workers), each with its checkpoints.
    """
    tokenizer_bytes = dict(tokenizer_bytes or {})
    first = {}  # a hub id benchmarked at two precisions is downloaded once
    for m in study.models:
        first.setdefault(m["path"], m)
    downloads = [model_download(path, path, study.parameters.get(m["name"]), checks.get(path))
                 for path, m in first.items()]
    kept = {"adapters": 0, "full checkpoints": 0, "teacher stores": 0, "rung states": 0}
    counts = {"adapters": 0, "full checkpoints": 0, "teacher stores": 0, "rung states": 0}
    in_flight = 0
    fitting = [r for r in study.runs if r.fit.fits]

    def output_bytes(run) -> int:
        return saved_weight_bytes(run.fit) + tokenizer_bytes.get(run.fit.model, TOKENIZER_BYTES)

    def count(part: str, bytes_each: list[int]) -> None:
        kept[part] += sum(bytes_each)
        counts[part] += len(bytes_each)

    def largest(members, reaching: int, label, size) -> list[int]:
        """The sizes of the ``reaching`` largest of ``members`` (those reaching a rung), less those cached there."""
        cached = sum(label(r) in done for r in members)
        fresh = sorted((size(r) for r in members if label(r) not in done), reverse=True)
        return fresh[:max(0, reaching - cached)]

    from ftflow.plan.study import stratum_sizes

    halved = halving_grids(cfg, fitting)
    in_grids = {id(r) for members in halved for r in members}
    # A searched run is done once its last rung is cached.
    runs = [r for r in fitting if (rung_label(r.title, 1.0) if id(r) in in_grids else r.title) not in done]
    for run in runs:
        in_flight = max(in_flight, CHECKPOINTS_AT_ONCE * checkpoint_bytes(run.fit))
        if id(run) not in in_grids:
            count("full checkpoints" if run.fit.method in ("full", "distill") else "adapters", [output_bytes(run)])
    states: list[list[int]] = [[]]
    for members in halved:
        grid_states = []
        counts_by_rung = reaching(stratum_sizes(members), cfg.search.eta, cfg.search.rungs)
        for k, (fraction, reaching_it) in enumerate(zip(rung_fractions(cfg.search.rungs), counts_by_rung)):
            label = lambda r, f=fraction: rung_label(r.title, f)  # noqa: E731
            if fraction < 1 and cfg.runner.kind != "local":  # every state of every rung until the grid ends
                grid_states += largest(members, reaching_it, label, lambda r: rung_state_bytes(r.fit))
            elif fraction < 1 and k == 0:  # one at a time: the survivors' states and the one just finished
                grid_states += largest(members, min(reaching_it, counts_by_rung[1] + 1), label,
                                       lambda r: rung_state_bytes(r.fit))
            elif fraction == 1:
                count("full checkpoints" if members[0].fit.method in ("full", "distill") else "adapters",
                      largest(members, reaching_it, label, output_bytes))
        states.append(grid_states)
    # The grids are searched one after another and each frees its rung states once its last rung has finished.
    count("rung states", max(states, key=sum))
    notes = []
    if any(r.fit.method == "distill" for r in runs) and study.teacher is not None:
        train = study.stats[study.teacher["name"]]["train"]
        if cfg.augment.enabled:
            train = train.scaled(cfg.augment.factor)
        k = max(cfg.distill.top_k)
        for variant in cfg.distill.loss:
            if not any(item.startswith("teacher_logits[") and item.endswith(f"|{variant}{k}]") for item in done):
                kept["teacher stores"] += teacher_store_bytes(train.total, k, variant)
                counts["teacher stores"] += 1
        if not train.exact:
            notes.append(f"the teacher stores' {train.total:,} positions are estimated (tokenizer not on this machine)")
    detail = [f"{counts[part]} {part if counts[part] != 1 else part.rstrip('s')} {size_text(size)}"
              for part, size in kept.items() if counts[part]]
    return DiskPlan(downloads, sum(kept.values()), detail, in_flight * max(1, workers), Path(hub_cache),
                    Path(cfg.artifacts_dir), notes)


def study_disk(cfg, report, study, done: Collection[str] = ()) -> DiskPlan:
    """:func:`plan_disk` for ``cfg``'s study as a run makes it: downloads sized by the hub check (``report``, a
    :class:`ftflow.models.hub.HubReport`; the tokenizer files it listed), one set of checkpoints per Dask worker the
    run starts (a given cluster's address: one run at a time is counted)."""
    from ftflow.models import hub

    tokenizer_bytes = {}
    for spec in cfg.models:
        check = report.checks.get(spec.path)
        if check is not None and check.files:
            tokenizer_bytes[spec.name] = sum(size for name, size in check.files if name in hub.TOKENIZER_FILES)
    workers = cfg.runner.n_workers if cfg.runner.kind == "dask" and cfg.runner.address is None else 1
    return plan_disk(cfg, study, report.checks, hub_cache=hub.hub_cache_dir(), done=done,
                     tokenizer_bytes=tokenizer_bytes, workers=workers)


def run_disk(cfg, report, left_out: Mapping[str, str], done: Collection[str] = ()) -> Optional[DiskPlan]:
    """The disk a run of ``cfg`` needs before it starts, on the device it runs on; None for a config with a zoo.

    Args:
        cfg: the :class:`ftflow.config.PipelineConfig`.
        report: its hub check (:func:`ftflow.models.hub.check_candidates`); the configs of hub ids ftflow does not
            know are read from the hub, so that they are sized too.
        left_out: ``{model name: why}`` of models the run will not use.
        done: labels of the stage runs already cached (:attr:`ftflow.stages.status.PipelineStatus.cached_labels`).
    """
    from ftflow.models import hub
    from ftflow.models.architecture import fetched_configs_dir
    from ftflow.models.loading import resolve_device
    from ftflow.plan.candidates import planned_bf16
    from ftflow.plan.study import plan_study

    if not cfg.models:  # a zoo's models are built by the run at its own small sizes (the demo's: < 1M parameters)
        return None
    device = resolve_device(cfg.device)
    hub.fetch_configs(report, fetched_configs_dir(cfg.artifacts_dir))
    study = plan_study(cfg, device=device, bf16_supported=planned_bf16(device), left_out=left_out,
                       config_dir=fetched_configs_dir(cfg.artifacts_dir))
    return study_disk(cfg, report, study, done)


class NotEnoughDiskError(UserError):
    """A file system lacks the disk a study needs: the run is refused before it starts."""


def refuse_short_disk(plan: DiskPlan, source: str) -> None:
    """Refuse to start a study when a file system lacks the disk ``plan`` says it needs, with the figures.

    Args:
        plan: the study's :class:`DiskPlan` (:func:`run_disk`).
        source: the config file as the user named it (for the fixes the message gives).

    Raises:
        NotEnoughDiskError: :meth:`DiskPlan.shortfalls` names a file system.
    """
    if shortfalls := plan.shortfalls():
        raise NotEnoughDiskError(
            "not enough disk to start (nothing was run): " + "; ".join(shortfalls) + ". Needed:\n"
            + "\n".join(f"  - {line}" for line in plan.lines())
            + f"\n  Free space there, or move the downloads (HF_HUB_CACHE) or the outputs (artifacts_dir in {source}, "
              f"or --set artifacts_dir=DIR) to a larger disk; `ftflow plan {source}` shows every run")
