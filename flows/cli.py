"""The ``ftflow`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from ftflow.config import ConfigError, load_config

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def parse_overrides(pairs: list[str]) -> dict:
    """``["distill.alpha=0.3", "teacher.epochs=1"]`` -> nested mapping (values parsed as YAML)."""
    merged: dict = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set {pair!r}: expected KEY=VALUE, e.g. --set distill.alpha=0.3")
        dotted, raw = pair.split("=", 1)
        node = merged
        *parents, leaf = dotted.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(raw)
    return merged


def _run(args: argparse.Namespace) -> int:
    overrides = parse_overrides(args.set)
    cfg = load_config(args.config, overrides)  # fail fast, before Prefect starts
    if args.no_progress:  # also the libraries' own bars (loading and writing weights, datasets maps)
        import datasets
        import transformers

        transformers.utils.logging.disable_progress_bar()
        datasets.disable_progress_bars()
    from flows.pipeline import pipeline

    evaluation = pipeline(config_path=str(Path(args.config).resolve()), overrides=overrides,
                          progress=not args.no_progress)
    report = Path(evaluation["dir"]) / evaluation["files"]["report"]
    print()
    print((Path(evaluation["dir"]) / evaluation["files"]["leaderboard_md"]).read_text(encoding="utf-8"))
    print(f"report: {report}")
    print(f"artifacts: {cfg.artifacts_dir}")
    return 0


def _validate(args: argparse.Namespace) -> int:
    for path in args.configs:
        cfg = load_config(path)
        print(f"{path}: ok")
        if args.show:
            print(json.dumps(cfg.model_dump(mode="json"), indent=2))
    return 0


def _plan(args: argparse.Namespace) -> int:
    from ftflow import memory

    cfg = load_config(args.config)
    if not cfg.models:
        print("ftflow plan: this config builds its models (zoo:) when it runs; plan a config with a models: "
              "list (hub ids or directories), e.g. configs/seed-20gb.yaml", file=sys.stderr)
        return 2
    device = args.device or ("cuda" if cfg.device in ("auto", "cuda") else "cpu")
    budget = int((args.budget_gb or cfg.memory_budget_gb) * memory.GB)
    max_length = args.max_length or cfg.max_length
    plans, problems = [], []
    for spec in cfg.models:
        try:
            plans.append(memory.plan_model(
                spec.name, spec.path, budget, max_length=max_length, batch_size=args.batch_size,
                device=device, bf16_supported=memory.bf16_available(device) if device == "cpu" else True,
                logits_chunk_tokens=cfg.benchmark.logits_chunk_tokens, trust_remote_code=spec.trust_remote_code,
            ))
        except memory.UnknownModelError as exc:
            problems.append(f"{spec.name}: {exc}")
    frame = memory.plan_table(plans)
    out = Path(args.out) if args.out else cfg.artifacts_dir / "plan"
    out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out / "plan.csv", index=False)
    (out / "plan.md").write_text(memory.plan_markdown(frame) + "\n", encoding="utf-8")
    memory.plot_plan(frame, budget, out / "plan.png")
    print(f"memory plan for {args.config}: budget {budget / memory.GB:g} GB, {device}, sequences of "
          f"{max_length} tokens (worst case unless --max-length)\n")
    print(memory.plan_markdown(frame))
    for plan in plans:
        print(f"- {plan.name}: {plan.reason}")
    for problem in problems:
        print(f"- {problem}", file=sys.stderr)
    print(f"\nwritten: {out}/plan.csv, plan.md, plan.png")
    return 1 if problems else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ftflow", description="Which base model, method and precision give the "
                                     "lowest perplexity on your test set within your memory budget.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the whole pipeline (default config: the offline demo)")
    run.add_argument("config", nargs="?", default=str(DEFAULT_CONFIG), help="YAML config (default: configs/demo.yaml)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config value, e.g. --set distill.alpha=0.3 (repeatable)")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.set_defaults(handler=_run)
    plan = commands.add_parser("plan", help="predict each model's peak memory and choose its precision, loading nothing")
    plan.add_argument("config", help="YAML config with a models: list")
    plan.add_argument("--budget-gb", type=float, help="memory budget in GB (default: the config's memory_budget_gb)")
    plan.add_argument("--max-length", type=int, help="tokens per sequence to plan for (default: the config's)")
    plan.add_argument("--batch-size", type=int, help="fixed evaluation batch size (default: the largest that fits)")
    plan.add_argument("--device", choices=["cuda", "cpu"], help="where the models will run (default: from config)")
    plan.add_argument("--out", help="folder for plan.csv/md/png (default: <artifacts_dir>/plan)")
    plan.set_defaults(handler=_plan)
    validate = commands.add_parser("validate", help="check config files without running anything")
    validate.add_argument("configs", nargs="+", help="YAML configs")
    validate.add_argument("--show", action="store_true", help="print the resolved config")
    validate.set_defaults(handler=_validate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except ConfigError as exc:
        print(f"ftflow: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
