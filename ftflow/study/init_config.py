"""A config to start from on one's own data (``ftflow init``): every field at its documented default.

The YAML is written from the typed config's own fields (:class:`ftflow.config.PipelineConfig`: each field's
default and its description as a comment), so it cannot drift from what ftflow reads; only the data files, the
candidate models and (if given) the memory budget are the user's. It is then loaded back with ftflow's own
loader, its paths checked and both data files read, before anything is said to be ready.

Candidate models (``--models``):

* ``demo``: the offline demo's zoo (``configs/demo.yaml``: three small families built and pretrained here, on
  a CPU, in minutes);
* ``seed``: the study's hub models (``configs/seed-20gb.yaml``: 12 models, a 20 GB GPU and the hub);
* hub ids or model directories: one candidate each; its family (models of one family share a tokenizer, which
  selection and distillation rely on) is guessed from the name up to its size (``Qwen/Qwen2.5-0.5B`` ->
  ``qwen2.5``), and said so.
"""

from __future__ import annotations

import re
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml
from pydantic import BaseModel, TypeAdapter

from ftflow.config import PipelineConfig, check_paths, load_config, parse_config
from ftflow.errors import UserError

CONFIG_NAME = "ftflow.yaml"
CONFIGS = Path(__file__).resolve().parents[2] / "configs"
WIDTH = 110
_SIZE = re.compile(r"[-_](\d+(\.\d+)?[bBmM])(\b|[-_])")


class InitError(UserError):
    """``ftflow init`` cannot write a config: the message says what and how to fix it."""


def guess_family(model_id: str) -> str:
    """A family name from a hub id or directory: the name up to its size, lower-cased (``granite-3.3-8b-base`` ->
    ``granite-3.3``, ``TinyLlama-1.1B-Chat-v1.0`` -> ``tinyllama``); the whole name when it has no size."""
    name = Path(model_id.rstrip("/")).name
    match = _SIZE.search(name)
    return (name[:match.start()] if match and match.start() > 0 else name).lower()


def candidate_models(models: Sequence[str]) -> tuple[dict, list[str]]:
    """The config's model source for ``--models`` (``{"zoo": ...}`` or ``{"models": [...]}``) and notes to print."""
    if list(models) == ["demo"]:
        raw = yaml.safe_load((CONFIGS / "demo.yaml").read_text(encoding="utf-8"))
        return {"zoo": raw["zoo"]}, ["candidate models: the offline demo's zoo (configs/demo.yaml), built here"]
    if list(models) == ["seed"]:
        raw = yaml.safe_load((CONFIGS / "seed-20gb.yaml").read_text(encoding="utf-8"))
        return {"models": raw["models"]}, [f"candidate models: the study's {len(raw['models'])} hub models "
                                           "(configs/seed-20gb.yaml): a GPU and the hub (or its cache) needed"]
    if "demo" in models or "seed" in models:
        raise InitError("--models demo and --models seed stand alone; give either one of them or hub ids / model "
                        "directories")
    specs, families = [], {}
    for model_id in models:
        path = Path(model_id).expanduser()
        family = guess_family(model_id)
        families.setdefault(family, []).append(model_id)
        specs.append({"name": path.name if path.exists() else model_id.rstrip("/").split("/")[-1],
                      "path": str(path.resolve()) if path.exists() else model_id, "family": family})
    names = [s["name"] for s in specs]
    if len(set(names)) < len(names):
        raise InitError(f"two models would have the same name ({sorted(n for n in names if names.count(n) > 1)}); "
                        "edit the names in the config, or give them once")
    notes = [f"families guessed from the names (models of one family must share a tokenizer; edit `family:` if "
             f"not): {'; '.join(f'{f}: {len(ids)} model(s)' for f, ids in families.items())}"]
    if not any(len(ids) >= 2 for ids in families.values()):
        notes.append("no family has two models: selection needs a teacher and a smaller student of one family "
                     "(add another size of one of them)")
    return {"models": specs}, notes


def _model_class(annotation: Any) -> Optional[type[BaseModel]]:
    """The pydantic model a field holds (also through Optional), or None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(inner) == 1:
            return _model_class(inner[0])
    return None


def _scalar(value: Any) -> str:
    """One YAML value on one line (mappings and lists in flow style)."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**6, sort_keys=False).strip().removesuffix("\n...")


def _comment(text: str, indent: str) -> list[str]:
    return [f"{indent}# {line}" for line in textwrap.wrap(" ".join(text.split()), WIDTH - len(indent) - 2)]


def _emit(cls: type[BaseModel], values: dict, depth: int = 0) -> list[str]:
    """The YAML lines of ``values`` (a dump of ``cls``), each field preceded by its description."""
    indent, lines = "  " * depth, []
    for name, field in cls.model_fields.items():
        value = values[name]
        if field.description:
            lines += _comment(field.description, indent)
        nested = _model_class(field.annotation)
        if nested is not None and isinstance(value, dict):
            lines.append(f"{indent}{name}:")
            lines += _emit(nested, value, depth + 1)
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            lines.append(f"{indent}{name}:")
            lines += [f"{indent}  - {_scalar(item)}" for item in value]
        else:
            lines.append(f"{indent}{name}: {_scalar(value)}")
    return lines


def config_text(train_file: Path, test_file: Path, models: Sequence[str] = ("demo",),
                budget_gb: Optional[float] = None) -> tuple[str, list[str]]:
    """The config's YAML (every field at its default but the data files, the models and the budget) and notes."""
    source, notes = candidate_models(models)
    raw: dict[str, Any] = {"data": {"train_file": str(Path(train_file).resolve()),
                                    "test_file": str(Path(test_file).resolve())}, **source}
    if budget_gb is not None:
        raw["memory_budget_gb"] = budget_gb
    cfg = parse_config(raw, Path.cwd(), source="ftflow init")
    values = cfg.model_dump(mode="json")
    values["artifacts_dir"] = "artifacts"  # the documented default, relative to the config's folder
    for spec in values["models"]:  # as given: a hub id stays an id
        spec["path"] = next(m["path"] for m in source.get("models", []) if m["name"] == spec["name"])
    mine = "the data files, the candidate models and the memory budget" if budget_gb is not None else \
        "the data files and the candidate models"
    head = [
        "# Written by `ftflow init`: every field at its documented default (each described above it), except",
        f"# {mine}.",
        "# Relative paths are relative to this file's folder. Unknown keys are errors. Check it: ftflow validate.",
        "",
    ]
    return "\n".join(head + _emit(PipelineConfig, values)) + "\n", notes


def write_config(directory: Path, train_file: Path, test_file: Path, models: Sequence[str] = ("demo",),
                 budget_gb: Optional[float] = None) -> tuple[Path, PipelineConfig, list[str]]:
    """Write ``directory/ftflow.yaml``, load it back with ftflow's loader and read both data files.

    Raises:
        InitError: ``directory`` exists and is not empty, or the files or models cannot be used (nothing is left
            behind).
    """
    from ftflow.data.splits import make_splits, read_sentences

    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise InitError(f"{directory} exists and is not an empty directory: give a new or empty one (nothing was "
                        "written)")
    for flag, path in (("--train", train_file), ("--test", test_file)):
        if not Path(path).is_file():
            raise InitError(f"{flag} {path}: no such file; give the {'training' if flag == '--train' else 'test'} "
                            "sentences (.txt one per line, .jsonl or .csv with a text column)")
    text, notes = config_text(train_file, test_file, models, budget_gb)
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / CONFIG_NAME
    path.write_text(text, encoding="utf-8")
    try:
        cfg = check_paths(load_config(path), source=str(path))
        make_splits(read_sentences(cfg.data.train_file, cfg.data.text_column),
                    read_sentences(cfg.data.test_file, cfg.data.text_column),
                    cfg.data.validation_fraction, cfg.data.seed)
    except UserError:
        path.unlink()
        if created:
            directory.rmdir()
        raise
    return path, cfg, notes


def next_commands(path: Path, cfg: PipelineConfig) -> list[str]:
    """The two commands to run next: see what will run (or plan hub models' memory), then run."""
    first = f"ftflow plan {path}" if cfg.models else f"ftflow status {path}"
    return [first, f"ftflow run {path}"]


CONFIGURATION_DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
"""The configuration reference, written by :func:`configuration_reference` (``python scripts/config_reference.py``)."""


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if isinstance(annotation, type) else None
    text = text or str(annotation).replace("typing.", "").replace("ftflow.config.", "")
    return text.replace("|", "\\|")


def configuration_reference() -> str:
    """The configuration reference in Markdown: every field of the typed config (:class:`PipelineConfig`), its type,
    its default and its description, section by section, so it cannot drift from what ftflow reads."""
    lines = ["# Configuration reference", "",
             "Generated from the typed config (`ftflow/config.py`) by `python scripts/config_reference.py`; a test",
             "checks it is current. `ftflow init` writes a config with every field at these defaults.", ""]

    def table(cls: type[BaseModel], prefix: str) -> None:
        rows, nested = [], []
        for name, field in cls.model_fields.items():
            inner = _model_class(field.annotation)
            if inner is not None:
                nested.append((f"{prefix}{name}", inner))
                continue
            if field.is_required():
                default = "(required)"
            else:
                value = TypeAdapter(Any).dump_python(field.get_default(call_default_factory=True), mode="json")
                default = f"`{_scalar(value)}`"
            description = " ".join((field.description or "").split()).replace("|", "\\|")
            rows.append(f"| `{prefix}{name}` | {_type_name(field.annotation)} | {default} | {description} |")
        if rows:
            lines.extend([f"## `{prefix.rstrip('.') or 'top level'}`", "", "| field | type | default | what |",
                          "|---|---|---|---|", *rows, ""])
        for name, inner in nested:
            table(inner, f"{name}.")

    table(PipelineConfig, "")
    return "\n".join(lines)
