"""Content-based cache keys for pipeline stages.

A stage's key is a hash of exactly what can change its output:

* the stage's own inputs: its slice of the config and the manifests of the
  stages it reads (each manifest counts by its ``fingerprint`` only, which is
  the key that produced it, so timings and paths inside don't matter);
* the content of every data file named in those inputs (not its name);
* the code of every project module the stage's task module reaches through
  its imports (:func:`reached_modules`: found by reading the import statements,
  lazy imports inside functions included, never from a hand-kept list; helper
  functions count too, which Prefect's ``TASK_SOURCE`` policy does not see),
  each by its normalized syntax tree (:func:`code_hash`), so comments,
  docstrings and formatting never change a key;
* the versions of the libraries that change numbers.

Nothing here imports Prefect; ``tasks/`` plugs :func:`stage_key` into a
Prefect cache policy.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import importlib.util
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from pydantic import BaseModel

from ftflow.artifacts import sha256_file, sha256_json

NUMERIC_LIBRARIES = ("torch", "transformers", "peft", "tokenizers", "bitsandbytes", "nlpaug", "datasets")
KEY_LENGTH = 20
# A task's parameters that say where or how to run, not what to compute: never in a key. report_to (where
# training curves go) changes which files a run writes beside its results, never a number in them.
NOT_IN_KEY = frozenset({"artifacts_dir", "progress", "checkpoint_steps", "report_to"})
# Prefect's cache record of a stage, inside its output directory (tasks/_stage.py): with it a run finds the
# stage Cached.
PREFECT_RECORD = "prefect-result.json"
PART_HASH_LENGTH = 16  # of each recorded part of a key (field values are recorded by hash only)


def key_inputs(parameters: dict[str, Any]) -> dict[str, Any]:
    """The parameters of a stage's task that determine its output (all but :data:`NOT_IN_KEY`)."""
    return {k: v for k, v in parameters.items() if k not in NOT_IN_KEY}


@lru_cache(maxsize=None)
def library_versions() -> dict[str, str]:
    """Installed versions of the libraries whose upgrades can change results."""
    versions = {}
    for name in NUMERIC_LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


PROJECT_PACKAGE = "ftflow"


def _find_top_level(name: str, search_path: Optional[Sequence[Path]]) -> Optional[Path]:
    """The file of a top-level module or package (its ``__init__.py``), without importing it."""
    if search_path is None:
        spec = importlib.util.find_spec(name)  # the loaded module's spec when it is imported already
        return Path(spec.origin) if spec is not None and spec.origin not in (None, "built-in", "frozen") else None
    for directory in search_path:
        for candidate in (Path(directory) / name / "__init__.py", Path(directory) / f"{name}.py"):
            if candidate.is_file():
                return candidate
    return None


def module_file(name: str, search_path: Optional[Sequence[Path]] = None) -> Optional[Path]:
    """The source file of a module (``a.b`` -> ``a/b.py`` or ``a/b/__init__.py``), or None if there is none.

    Args:
        name: Dotted module name.
        search_path: Directories to look for its top-level package in; None: where Python imports it from.
    """
    if search_path is None:
        return _installed_module_file(name)
    return _locate(name, tuple(Path(d) for d in search_path))


@lru_cache(maxsize=4096)
def _installed_module_file(name: str) -> Optional[Path]:
    # Where a module's file is does not change while a process runs (its contents may: they are hashed
    # by size and modification time), and a key is computed for every task run: look each name up once.
    return _locate(name, None)


class PackageWithoutInit(ImportError):
    """A folder of a project package holds modules but no ``__init__.py``."""


def _locate(name: str, search_path: Optional[tuple[Path, ...]]) -> Optional[Path]:
    top, *rest = name.split(".")
    path = _find_top_level(top, search_path)
    for part in rest:
        if path is None or path.name != "__init__.py":
            return None  # only packages have submodules
        package = path.parent
        path = next((c for c in (package / part / "__init__.py", package / f"{part}.py") if c.is_file()), None)
        if path is None and (package / part).is_dir() and any((package / part).glob("*.py")):
            # A namespace package: Python imports it, but a key built without its modules would not
            # change when they do.
            raise PackageWithoutInit(
                f"{package / part} holds modules but no __init__.py, so the cache keys of the stages that "
                f"import {name} would not see its code; add an __init__.py (a docstring is enough)")
    return path


def _with_parents(name: str) -> list[str]:
    # Importing a.b.c runs a/__init__.py and a/b/__init__.py first.
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def _is_main_guard(node: ast.stmt) -> bool:
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare) and isinstance(node.test.left, ast.Name)
            and node.test.left.id == "__name__" and len(node.test.comparators) == 1
            and isinstance(node.test.comparators[0], ast.Constant) and node.test.comparators[0].value == "__main__")


def _without_main_block(tree: ast.Module) -> ast.Module:
    # What runs only when the file is the program (python -m x.y) runs in a module named __main__, never when a
    # stage imports it: it computes nothing a key covers, and its imports are no edge of the import graph.
    tree.body = [node for node in tree.body if not _is_main_guard(node)]
    return tree


@lru_cache(maxsize=1024)
def _imported_names(path: str, size: int, mtime_ns: int, module: str) -> tuple[str, ...]:
    """Every module name an import statement of the file may load (attributes of modules included)."""
    tree = ast.parse(Path(path).read_bytes(), filename=path)
    is_package = Path(path).name == "__init__.py"
    names: list[str] = []
    for node in ast.walk(_without_main_block(tree)):  # every statement: imports inside functions count too
        if isinstance(node, ast.Import):
            for alias in node.names:
                names += _with_parents(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                # "from . import x" is relative to the module's package (a package's own for __init__.py).
                package = module.split(".") if is_package else module.split(".")[:-1]
                up = node.level - 1
                if up >= len(package):
                    raise ImportError(f"{path}: relative import beyond the top-level package")
                base = ".".join(package[: len(package) - up] + ([node.module] if node.module else []))
            else:
                base = node.module
            names += _with_parents(base)
            # "from a import b": b is a submodule or an attribute of a; only a submodule has a file.
            names += [f"{base}.{alias.name}" for alias in node.names if alias.name != "*"]
    return tuple(names)


def reached_modules(roots: Iterable[str], packages: Optional[Iterable[str]] = None,
                    search_path: Optional[Sequence[Path]] = None) -> tuple[str, ...]:
    """Every project module the ``roots`` reach through their imports, the roots included (sorted).

    Found statically from the source (``import a.b``, ``from a import b``, ``from a.b import c``,
    relative imports, and imports inside functions), following imports transitively, so nothing
    is imported or run. Only the project's packages are followed: ``ftflow`` and the top-level
    packages of the roots (``tasks`` for a task module); third-party libraries count by version.

    Args:
        roots: Dotted names of the modules to start from, e.g. ``("tasks.train",)``.
        packages: Top-level package names to follow; None: ``ftflow`` and those of the roots.
        search_path: Directories holding the top-level packages; None: where Python imports them from.

    Returns:
        The sorted dotted names of every reached module (packages' ``__init__`` included).

    Raises:
        ModuleNotFoundError: A root has no source file.
    """
    roots = tuple(roots)
    followed = set(packages) if packages is not None else {PROJECT_PACKAGE} | {r.split(".")[0] for r in roots}
    files: dict[str, Path] = {}
    pending = []
    for root in roots:
        for name in _with_parents(root):
            path = module_file(name, search_path)
            if path is None:
                raise ModuleNotFoundError(f"no source file for module {name!r}, which a stage's code key starts "
                                          "from; pass the task module's dotted name, e.g. 'tasks.train'")
            if name not in files:
                files[name] = path
                pending.append(name)
    while pending:
        name = pending.pop()
        path = files[name]
        stat = path.stat()
        for imported in _imported_names(str(path), stat.st_size, stat.st_mtime_ns, name):
            if imported in files or imported.split(".")[0] not in followed:
                continue
            found = module_file(imported, search_path)
            if found is not None:  # None: an attribute imported from a module, not a module
                files[imported] = found
                pending.append(imported)
    return tuple(sorted(files))


def _without_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:]
    return tree


def code_hash(source: str | bytes, filename: str = "<source>") -> str:
    """SHA-256 of a module's code: its syntax tree without docstrings, so comments and formatting (which
    the parser drops), docstrings and line numbers never change it, and any change to what runs does.

    Args:
        source: The module's source text.
        filename: For the syntax error's message only.
    """
    tree = _without_docstrings(ast.parse(source, filename=filename))
    return hashlib.sha256(ast.dump(tree, include_attributes=False).encode()).hexdigest()


@lru_cache(maxsize=1024)
def _code_hash_cached(path: str, size: int, mtime_ns: int) -> str:
    return code_hash(Path(path).read_bytes(), filename=path)


def import_graph(packages: Iterable[str], search_path: Optional[Sequence[Path]] = None) -> dict[str, set[str]]:
    """{module: the project modules its import statements load} for every module of ``packages``.

    The edges :func:`reached_modules` follows (the same statements, lazy imports included), parent packages
    left out: importing ``a.b`` runs ``a/__init__.py``, which is not a dependency of the importer's code.

    Args:
        packages: Top-level package names, e.g. ``("ftflow", "tasks", "flows")``.
        search_path: Directories holding them; None: where Python imports them from.
    """
    packages = tuple(packages)
    graph: dict[str, set[str]] = {}
    for package in packages:
        init = module_file(package, search_path)
        for path in sorted(init.parent.rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            parts = path.relative_to(init.parent.parent).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            stat = path.stat()
            imported = _imported_names(str(path), stat.st_size, stat.st_mtime_ns, name)
            graph[name] = {other for other in imported if other.split(".")[0] in packages and other != name
                           and not name.startswith(other + ".") and module_file(other, search_path) is not None
                           and module_file(other, search_path).name != "__init__.py"}
    return graph


def module_hashes(roots: Iterable[str], search_path: Optional[Sequence[Path]] = None) -> dict[str, str]:
    """{module: :func:`code_hash` of its source} for every project module the ``roots`` reach
    (:func:`reached_modules`)."""
    hashes = {}
    for name in reached_modules(roots, search_path=search_path):
        path = module_file(name, search_path)
        stat = path.stat()
        hashes[name] = _code_hash_cached(str(path), stat.st_size, stat.st_mtime_ns)
    return hashes


def code_version(roots: Iterable[str], search_path: Optional[Sequence[Path]] = None) -> str:
    """Hash of the code of every project module the ``roots`` reach (see :func:`reached_modules`,
    :func:`code_hash`)."""
    digest = hashlib.sha256()
    for name, source_hash in module_hashes(roots, search_path).items():
        digest.update(name.encode())
        digest.update(b"\0")
        digest.update(source_hash.encode())
    return digest.hexdigest()


def _file_fingerprint(path: Path) -> dict:
    # Hashing a file is cheap next to any stage; cache it per (path, size, mtime).
    stat = path.stat()
    return {"sha256": _sha256_cached(str(path.resolve()), stat.st_size, stat.st_mtime_ns)}


@lru_cache(maxsize=256)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(Path(path))


# How a path inside the artifacts directory enters a key: relative to it, so a copied or moved directory
# (or one mounted elsewhere) gives the same keys. Its content is in the key already: it is a stage's output,
# under that stage's content key.
IN_ARTIFACTS = "<artifacts_dir>"


def canonical(value: Any, artifacts_dir: Optional[str | Path] = None) -> Any:
    """A JSON-ready form of a stage input in which only content matters.

    Manifests (dicts with a ``fingerprint``) become their fingerprint; paths
    to existing files become their SHA-256; pydantic models become dicts; any
    other path inside ``artifacts_dir`` (a zoo checkpoint's directory, given as
    a string or a path) becomes ``<artifacts_dir>/<path relative to it>``.
    """
    root = None if artifacts_dir is None else os.path.normpath(str(Path(artifacts_dir).resolve()))
    return _canonical(value, root)


def _canonical(value: Any, root: Optional[str]) -> Any:
    if isinstance(value, BaseModel):
        return {k: _canonical(getattr(value, k), root) for k in type(value).model_fields}
    if isinstance(value, dict):
        if "fingerprint" in value and "stage" in value:
            return {"manifest": value["stage"], "fingerprint": value["fingerprint"]}
        return {str(k): _canonical(v, root) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v, root) for v in value]
    if isinstance(value, Path) and value.is_file():
        return _file_fingerprint(value)
    if isinstance(value, (str, Path)):
        text = str(value)
        if root is not None and os.path.isabs(text):
            path = os.path.normpath(text)
            if path == root or path.startswith(root.rstrip(os.sep) + os.sep):
                return "/".join([IN_ARTIFACTS, *Path(os.path.relpath(path, root)).parts])
        return text
    if isinstance(value, (int, float, bool)) or value is None:
        return value
    raise TypeError(f"cannot make a cache key from a {type(value).__name__}; pass plain values, configs or manifests")


def stage_key(stage: str, inputs: dict[str, Any], modules: Iterable[str],
              artifacts_dir: Optional[str | Path] = None) -> str:
    """The content key of one stage run (hex, :data:`KEY_LENGTH` characters).

    Args:
        stage: The stage's name.
        inputs: The parameters that determine its output.
        modules: Where its code starts: the task module's dotted name; the key covers every project
            module reached from there (:func:`code_version`).
        artifacts_dir: The run's artifacts directory: paths inside it count relative to it (:func:`canonical`).
    """
    return key_and_parts(stage, inputs, modules, artifacts_dir)[0]


def key_and_parts(stage: str, inputs: dict[str, Any], modules: Iterable[str],
                  artifacts_dir: Optional[str | Path] = None) -> tuple[str, dict]:
    """The stage's key (:func:`stage_key`) and what went into it, part by part (:func:`key_parts`)."""
    material = {
        "stage": stage,
        "inputs": canonical(inputs, artifacts_dir),
        "code": code_version(modules),
        "libraries": library_versions(),
    }
    return sha256_json(material)[:KEY_LENGTH], key_parts(material["inputs"], modules)


def _leaves(value: Any, path: str) -> Iterable[tuple[str, Any]]:
    """(dotted path, value) of every leaf of a canonical input; an upstream manifest or a file is one leaf."""
    if isinstance(value, dict) and value and not ("manifest" in value or set(value) == {"sha256"}):
        for name, item in value.items():
            yield from _leaves(item, f"{path}.{name}" if path else name)
    elif isinstance(value, list) and value:
        for index, item in enumerate(value):
            yield from _leaves(item, f"{path}[{index}]")
    else:
        yield path, value


def key_parts(canonical_inputs: dict, modules: Iterable[str]) -> dict:
    """What a stage key is made of, part by part, to say later which part changed (no value is recorded).

    Args:
        canonical_inputs: the stage's inputs after :func:`canonical`.
        modules: where the stage's code starts (its task module).

    Returns:
        ``{"inputs": {dotted field: part}, "code": {module: source hash}, "libraries": {name: version}}``
        where a part is ``{"kind": "value", "hash": ...}`` (a config field or parameter, by the hash of its
        value, so a secret never lands in a manifest), ``{"kind": "file", "hash": ...}`` (a file, by
        content) or ``{"kind": "upstream", "stage": ..., "fingerprint": ...}`` (another stage's manifest).
    """
    inputs = {}
    for path, value in _leaves(canonical_inputs, ""):
        if isinstance(value, dict) and "manifest" in value:
            inputs[path] = {"kind": "upstream", "stage": value["manifest"], "fingerprint": value["fingerprint"]}
        elif isinstance(value, dict) and set(value) == {"sha256"}:
            inputs[path] = {"kind": "file", "hash": value["sha256"][:PART_HASH_LENGTH]}
        else:
            inputs[path] = {"kind": "value", "hash": sha256_json(value)[:PART_HASH_LENGTH]}
    code = {name: digest[:PART_HASH_LENGTH] for name, digest in module_hashes(modules).items()}
    return {"inputs": inputs, "code": code, "libraries": dict(library_versions())}
