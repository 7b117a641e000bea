"""Successive halving against grid search: the same winners, at what share of the grid's compute (issue 28).

    python bench/search_efficiency.py [--quick] [--study demo-full|sst2] [--artifacts DIR]

Runs a study twice on the same artifacts directory with the ``ftflow`` CLI (each run with its own temporary
Prefect server), ``search.strategy: grid`` then ``halving`` (eta 3, rungs 1/4 and 1/2): the data, zoo,
benchmarks and single runs are shared (cached), the grids' runs are not (a rung's key is its own). Studies:
``configs/demo-full.yaml``, and SST-2 with the demo's zoo and demo-full's grids when ``../shared/data`` is
there (``--study`` runs one of them alone); ``--quick``: the flow tests' micro config (``tests/flows/micro.py``)
with grids of 6 (LoRA), 4 (prefix) and 4 (distillation) combinations, 2 epochs.

Prints, per grid: the grid-mode winner (lowest selection PPL of every combination trained to the end) and
halving's, whether they are the same or, when not, whether the halving winner's test PPL is within the paired
bootstrap noise of the grid winner's (:func:`ftflow.study.uncertainty.paired_difference`), and the compute
halving spent against the grid's: training tokens and planner FLOPs (the report's halving summary), and the
measured training seconds of both modes. Last line: ``halving: same winners N of N, compute 0.xx of grid``
(training tokens, every grid together). Goal: the same winners at at most 0.5 of the grid's training tokens.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from ftflow.artifacts import MANIFEST  # noqa: E402
from ftflow.config import load_config  # noqa: E402
from ftflow.stages.status import pipeline_status  # noqa: E402
from ftflow.study.uncertainty import SentenceScores, paired_difference  # noqa: E402
from ftflow.train.jobs import best_run  # noqa: E402

CLI = [sys.executable, "-m", "flows.cli"]
SST2 = ROOT.parent / "shared" / "data" / "sst2"
HALVING = {"strategy": "halving", "eta": 3, "rungs": [0.25, 0.5]}


def _write(config: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def studies(quick: bool, workdir: Path, artifacts: Path) -> list[tuple[str, Path]]:
    """(name, config path) of each study, every one writing into ``artifacts``."""
    if quick:
        from tests.flows.micro import micro_config

        raw = yaml.safe_load(micro_config(workdir).read_text(encoding="utf-8"))
        raw["lora"].update(r=[2, 4, 8], alpha=[8, 16], epochs=2)
        raw["prefix"].update(num_virtual_tokens=[2, 4], learning_rate=[0.01, 0.03], epochs=2)
        raw["distill"].update(top_k=[2, 4], alpha=[0.25, 0.75], epochs=2)
        raw["artifacts_dir"] = str(artifacts)
        return [("micro", _write(raw, workdir / "micro.yaml"))]
    full = yaml.safe_load((ROOT / "configs" / "demo-full.yaml").read_text(encoding="utf-8"))
    full["artifacts_dir"] = str(artifacts)
    found = [("demo-full", _write(full, ROOT / "configs" / f".search-efficiency-{workdir.name}-demo-full.yaml"))]
    if SST2.is_dir():
        sst2 = yaml.safe_load((ROOT / "configs" / "sst2-offline.yaml").read_text(encoding="utf-8"))
        sst2.update({k: full[k] for k in ("lora", "prefix", "distill")}, artifacts_dir=str(artifacts))
        found.append(("sst2", _write(sst2, ROOT / "configs" / f".search-efficiency-{workdir.name}-sst2.yaml")))
    return found


def run(config: Path, strategy: str) -> None:
    """``ftflow run CONFIG`` under ``strategy``; stops the benchmark on a failure, with its output."""
    search = HALVING if strategy == "halving" else {"strategy": "grid"}
    raw = yaml.safe_load(config.read_text(encoding="utf-8"))
    raw["search"] = search
    _write(raw, config)
    done = subprocess.run([*CLI, "run", str(config), "--no-progress"], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{config} under {strategy} failed (exit {done.returncode}):\n{done.stdout[-3000:]}\n"
                 f"{done.stderr[-3000:]}")


def train_manifests(config: Path) -> list[dict]:
    """Every train stage run the config's last run made (as ``ftflow status`` finds them, all cached)."""
    found = []
    for entry in pipeline_status(load_config(config)).stages:
        if entry.stage == "train" and entry.state == "cached":
            found.append(json.loads((entry.directory / MANIFEST).read_text(encoding="utf-8")) |
                         {"dir": str(entry.directory)})
    return found


def test_scores(manifest: dict) -> SentenceScores:
    record = json.loads((Path(manifest["dir"]) / manifest["files"]["per_sentence"]).read_text(encoding="utf-8"))
    return SentenceScores.from_record(record["test"])


def compare(name: str, config: Path) -> list[dict]:
    """Grid mode, then halving, on the same artifacts; one row per grid."""
    run(config, "grid")
    grid_runs = {m["name"]: m for m in train_manifests(config) if "rung" not in m}
    run(config, "halving")
    cfg = load_config(config)
    evaluation = pipeline_status(cfg).evaluation
    finals = {m["name"]: m for m in train_manifests(config) if (m.get("rung") or {}).get("fraction") == 1.0}
    rows = []
    for summary in evaluation["halving"]:
        names = [r["name"] for r in summary["rows"]]
        grid_winner = best_run([grid_runs[n] for n in names])
        halving_winner = finals[summary["winner"]]
        same = grid_winner["name"] == halving_winner["name"]
        noise = None
        if not same:
            noise = paired_difference(test_scores(halving_winner), test_scores(grid_winner), "ppl")
        grid_seconds = sum(float(grid_runs[n].get("train_seconds") or 0.0) for n in names)
        rows.append({"study": name, "grid": summary["grid"], "combinations": len(names),
                     "grid_winner": grid_winner["name"], "halving_winner": halving_winner["name"], "same": same,
                     "within_noise": None if noise is None else noise.within_noise,
                     "difference": None if noise is None else noise.text(),
                     "tokens": summary["spent"]["tokens"], "grid_tokens": summary["full"]["tokens"],
                     "flops": summary["spent"]["flops"], "grid_flops": summary["full"]["flops"],
                     "seconds": summary["spent"]["seconds"], "grid_seconds": grid_seconds})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the flow tests' micro config with larger grids")
    parser.add_argument("--study", choices=("demo-full", "sst2"),
                        help="run this study alone (default: demo-full, and sst2 when ../shared/data is there)")
    parser.add_argument("--artifacts", type=Path, help="artifacts directory (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="search-efficiency-") as tmp:
        workdir = Path(tmp)
        artifacts = (args.artifacts or workdir / "artifacts").resolve()
        configs = studies(args.quick, workdir, artifacts)
        if args.study and not args.quick:
            chosen = [(name, config) for name, config in configs if name == args.study]
            for name, config in configs:
                if name != args.study:
                    config.unlink(missing_ok=True)
            if not chosen:
                sys.exit(f"--study {args.study}: not available here (SST-2 needs {SST2})")
            configs = chosen
        rows = []
        try:
            for name, config in configs:
                rows += compare(name, config)
        finally:
            for _, config in configs:
                if config.parent == ROOT / "configs":
                    config.unlink(missing_ok=True)
    print("| study | grid | combinations | grid winner | halving winner | same | test PPL, halving - grid | "
          "training tokens | FLOPs | measured seconds |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['study']} | {r['grid']} | {r['combinations']} | {r['grid_winner']} | {r['halving_winner']} | "
              f"{'yes' if r['same'] else 'no'} | "
              f"{'-' if r['same'] else r['difference']} | {r['tokens'] / r['grid_tokens']:.2f} | "
              f"{r['flops'] / r['grid_flops']:.2f} | {r['seconds']:.1f} of {r['grid_seconds']:.1f} |")
    same = sum(r["same"] or bool(r["within_noise"]) for r in rows)
    ratio = sum(r["tokens"] for r in rows) / sum(r["grid_tokens"] for r in rows)
    print(f"halving: same winners {same} of {len(rows)}, compute {ratio:.2f} of grid")
    return 0


if __name__ == "__main__":
    sys.exit(main())
