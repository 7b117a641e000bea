from pathlib import Path

from ftflow.config import DistillConfig
from ftflow.stages.caching import canonical, stage_key

MODULES = ("ftflow.stages.caching",)


def test_key_depends_on_config_values_not_on_object_identity():
    assert stage_key("s", {"d": DistillConfig()}, MODULES) == stage_key("s", {"d": DistillConfig()}, MODULES)
    assert stage_key("s", {"d": DistillConfig()}, MODULES) != stage_key("s", {"d": DistillConfig(alpha=0.1)}, MODULES)
    assert stage_key("s", {"x": 1}, MODULES) != stage_key("t", {"x": 1}, MODULES)


def test_files_count_by_content_not_by_name(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("same words\n")
    b.write_text("same words\n")
    assert stage_key("s", {"f": a}, MODULES) == stage_key("s", {"f": b}, MODULES)
    b.write_text("other words\n")
    assert stage_key("s", {"f": a}, MODULES) != stage_key("s", {"f": b}, MODULES)


def test_manifests_count_by_fingerprint_only():
    one = {"stage": "augment", "fingerprint": "abc", "seconds": 1.0, "dir": "/x"}
    two = {"stage": "augment", "fingerprint": "abc", "seconds": 9.0, "dir": "/y"}
    assert canonical(one) == canonical(two) == {"manifest": "augment", "fingerprint": "abc"}
    assert stage_key("s", {"m": one}, MODULES) == stage_key("s", {"m": two}, MODULES)
    assert stage_key("s", {"m": one}, MODULES) != stage_key("s", {"m": dict(one, fingerprint="abd")}, MODULES)


def test_code_of_the_stage_modules_is_in_the_key():
    assert stage_key("s", {}, ("ftflow.stages.caching",)) != stage_key("s", {}, ("ftflow.stages.caching", "ftflow.data.splits"))


def test_unhashable_inputs_are_refused():
    import pytest

    with pytest.raises(TypeError, match="cannot make a cache key"):
        canonical(object())
    assert canonical(Path("/does/not/exist")) == "/does/not/exist"


# -- the code key: every project module a stage reaches, from the import graph ------------------------------

import ast  # noqa: E402
import shutil  # noqa: E402
import textwrap  # noqa: E402

import pytest  # noqa: E402

from ftflow.stages.caching import code_version, module_file, reached_modules  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
STAGE_MODULES = ("prepare_data", "augment", "zoo", "plan_memory", "benchmark", "select_family", "train",
                 "teacher_logits", "evaluate")
# What every stage reaches through tasks._stage (the output protocol and the key itself).
COMMON = ("ftflow", "ftflow.artifacts", "ftflow.config", "ftflow.errors", "ftflow.stages", "ftflow.stages.caching",
          "tasks", "tasks._locks", "tasks._stage")


def write_package(root: Path, files: dict[str, str]) -> None:
    for relative, source in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source), encoding="utf-8")


SYNTHETIC = {
    "pkg/__init__.py": "from . import base\n",
    "pkg/base.py": "",
    "pkg/stage.py": """
        import json
        import pkg.direct
        from pkg import sibling
        from pkg.sub.deep import THING
        import other.mod

        def later():
            from .lazy import value  # a lazy relative import inside a function
            return value
    """,
    "pkg/direct.py": "from pkg.transitive import y\n",
    "pkg/transitive.py": "y = 1\n",
    "pkg/sibling.py": "import pkg.stage  # a cycle back to the root\n",
    "pkg/sub/__init__.py": "",
    "pkg/sub/deep.py": "from .. import leaf\nTHING = 2\n",
    "pkg/leaf.py": "",
    "pkg/lazy.py": "def f():\n    import pkg.lazier\nvalue = 3\n",
    "pkg/lazier.py": "",
    "pkg/unreached.py": "",
    "other/__init__.py": "",
    "other/mod.py": "import pkg.unreached\n",
}


def test_reached_modules_follow_every_import_form_transitively_within_the_project(tmp_path):
    write_package(tmp_path, SYNTHETIC)
    # json (stdlib) and `other` (not a followed package) are left out, and so is what only `other` imports.
    assert reached_modules(["pkg.stage"], search_path=[tmp_path]) == (
        "pkg", "pkg.base", "pkg.direct", "pkg.lazier", "pkg.lazy", "pkg.leaf", "pkg.sibling", "pkg.stage",
        "pkg.sub", "pkg.sub.deep", "pkg.transitive")
    assert reached_modules(["pkg.stage"], packages=["pkg", "other"], search_path=[tmp_path]) == (
        "other", "other.mod", "pkg", "pkg.base", "pkg.direct", "pkg.lazier", "pkg.lazy", "pkg.leaf", "pkg.sibling",
        "pkg.stage", "pkg.sub", "pkg.sub.deep", "pkg.transitive", "pkg.unreached")
    assert module_file("pkg.sub.deep", [tmp_path]) == tmp_path / "pkg" / "sub" / "deep.py"
    assert module_file("pkg.sub.deep.THING", [tmp_path]) is None


def test_code_version_changes_with_a_module_reached_only_indirectly_and_not_with_an_unreached_one(tmp_path):
    write_package(tmp_path, SYNTHETIC)
    before = code_version(["pkg.stage"], search_path=[tmp_path])
    unreached = tmp_path / "pkg" / "unreached.py"
    unreached.write_text("CHANGED = True\n")
    assert code_version(["pkg.stage"], search_path=[tmp_path]) == before
    lazier = tmp_path / "pkg" / "lazier.py"  # stage -> lazy (inside a function) -> lazier (inside a function)
    lazier.write_text("CHANGED = True\n")
    assert code_version(["pkg.stage"], search_path=[tmp_path]) != before


def test_a_root_without_source_is_refused(tmp_path):
    with pytest.raises(ModuleNotFoundError, match="no source file for module 'pkg'"):
        reached_modules(["pkg.stage"], search_path=[tmp_path])


def test_plan_memory_reaches_models_and_data_it_imports():
    assert reached_modules(["tasks.plan_memory"]) == tuple(sorted(COMMON + (
        "ftflow.data", "ftflow.data.splits", "ftflow.device", "ftflow.models", "ftflow.models.architecture",
        "ftflow.models.known", "ftflow.models.loading", "ftflow.perplexity", "ftflow.plan", "ftflow.plan.budget",
        "ftflow.plan.decide", "ftflow.plan.plots", "ftflow.plan.predict", "ftflow.plan.tables", "ftflow.tokens",
        "tasks.plan_memory")))


def test_train_reaches_known_models_through_the_memory_check():
    assert reached_modules(["tasks.train"]) == tuple(sorted(COMMON + (
        "ftflow.data", "ftflow.data.splits", "ftflow.device", "ftflow.distill", "ftflow.distill.losses",
        "ftflow.distill.store", "ftflow.distill.trainer", "ftflow.distill.vocabulary", "ftflow.models",
        "ftflow.models.architecture", "ftflow.models.known", "ftflow.models.loading", "ftflow.perplexity",
        "ftflow.plan", "ftflow.plan.budget", "ftflow.plan.decide", "ftflow.plan.fit", "ftflow.plan.predict",
        "ftflow.tokens", "ftflow.train", "ftflow.train.cards", "ftflow.train.jobs", "ftflow.train.optimizers",
        "ftflow.train.runner", "ftflow.train.rungs", "ftflow.train.trainer", "tasks.train")))


def test_every_stage_keys_its_code_from_its_own_module():
    import importlib

    for name in STAGE_MODULES:
        module = importlib.import_module(f"tasks.{name}")
        task = getattr(module, name)
        assert task.cache_policy.modules == (f"tasks.{name}",) == module.MODULES, name


def changed_stages(tmp_path: Path, edit: str, code: str = "EDITED = True\n") -> set[str]:
    """Stages whose code key changes when ``edit`` (a file of a copy of the project) gets ``code`` appended."""
    if not (tmp_path / "ftflow").exists():
        for package in ("ftflow", "tasks"):
            shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    before = {s: code_version([f"tasks.{s}"], search_path=[tmp_path]) for s in STAGE_MODULES}
    with open(tmp_path / edit, "a", encoding="utf-8") as handle:
        handle.write(code)
    return {s for s in STAGE_MODULES if code_version([f"tasks.{s}"], search_path=[tmp_path]) != before[s]}


def test_editing_a_module_reached_only_indirectly_changes_exactly_the_stages_that_reach_it(tmp_path):
    # ftflow/train/cards.py is imported by no task module: train reaches it through ftflow.train.runner. The
    # teacher pass loads a trained run through ftflow.models.loading and never reaches the training code, so a
    # model card's wording does not rerun it. Upstream stages' keys (and so everything they computed) stay as
    # they are; what depends on train reruns because its fingerprints change.
    assert changed_stages(tmp_path, "ftflow/train/cards.py") == {"train"}


def test_editing_a_plot_leaves_the_training_stages_keys_unchanged(tmp_path):
    # The memory plan's chart is drawn by plan_memory only: no training stage reaches plotting or report code.
    assert changed_stages(tmp_path, "ftflow/plan/plots.py") == {"plan_memory"}
    assert changed_stages(tmp_path, "ftflow/study/report.py") == {"evaluate"}


def test_editing_a_loss_changes_the_distillation_runs_and_nothing_upstream(tmp_path):
    # Distillation runs are train stage runs; the teacher pass, which only stores the teacher's targets, keeps
    # its key.
    assert changed_stages(tmp_path, "ftflow/distill/losses.py") == {"train"}


def test_editing_known_models_changes_the_memory_planning_stages_only(tmp_path):
    # tasks.train -> ftflow.plan.fit -> ftflow.models.architecture -> ftflow.models.known (the training memory check), as for plan_memory and
    # the teacher pass, which plans its own batch size (ftflow.plan.decide.plan_teacher_pass).
    assert changed_stages(tmp_path, "ftflow/models/known.py") == {"plan_memory", "train", "teacher_logits"}


def test_paths_inside_the_artifacts_directory_count_relative_to_it(tmp_path):
    """A copied or moved artifacts directory gives the same keys: its checkpoints' paths count relative to it."""
    def call(root: Path) -> dict:
        return {"spec": {"path": str(root / "zoo" / "k" / "qwen2-teacher")}, "hub": "Qwen/Qwen2.5-0.5B"}

    here, there = tmp_path / "here", tmp_path / "there"
    assert stage_key("s", call(here), MODULES, here) == stage_key("s", call(there), MODULES, there)
    assert canonical(call(here), here)["spec"]["path"] == "<artifacts_dir>/zoo/k/qwen2-teacher"
    # Another checkpoint, or one outside the artifacts directory, is another input.
    assert stage_key("s", call(here), MODULES, here) != stage_key("s", call(here / "x"), MODULES, here)
    assert stage_key("s", call(here), MODULES, there) != stage_key("s", call(there), MODULES, there)


# -- code counts by its syntax tree: documentation never retrains ------------------------------------------

def test_code_hash_ignores_comments_docstrings_and_formatting_but_not_code():
    from ftflow.stages.caching import code_hash

    source = 'def f(x):\n    return x + 1\n'
    documented = ('"""A module."""\n# why\n\n\ndef f( x ):  # a comment\n    """Adds one."""\n'
                  '    return (x +\n            1)\n')
    assert code_hash(source) == code_hash(documented)
    assert code_hash(source) != code_hash('def f(x):\n    return x + 2\n')
    # A string that is not a docstring is code.
    assert code_hash(source) != code_hash('def f(x):\n    y = "text"\n    return x + 1\n')


def project_modules() -> list[Path]:
    return sorted(p.relative_to(ROOT) for package in ("ftflow", "tasks") for p in (ROOT / package).rglob("*.py")
                  if "__pycache__" not in p.parts)


def edit_documentation(path: Path) -> None:
    """Give every docstring of a module more words and add comments and blank lines: its code unchanged."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                end = first.end_lineno - 1  # the docstring's closing line gets a word before its quotes
                text = lines[end].rstrip("\n")
                quote = text[-3:] if text[-3:] in ('"""', "'''") else text[-1]
                lines[end] = text[: len(text) - len(quote)] + " More words." + quote + "\n"
    path.write_text("# An added comment.\n\n" + "".join(lines) + "\n# Another comment.\n", encoding="utf-8")


def test_editing_comments_and_docstrings_of_every_module_leaves_every_stage_key_unchanged(tmp_path):
    for package in ("ftflow", "tasks"):
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    before = {s: code_version([f"tasks.{s}"], search_path=[tmp_path]) for s in STAGE_MODULES}
    for relative in project_modules():
        edit_documentation(tmp_path / relative)
        compile((tmp_path / relative).read_text(encoding="utf-8"), str(relative), "exec")  # still Python
    assert (tmp_path / "ftflow" / "stages" / "caching.py").read_text() != (ROOT / "ftflow" / "stages" / "caching.py").read_text()
    assert {s: code_version([f"tasks.{s}"], search_path=[tmp_path]) for s in STAGE_MODULES} == before


def test_a_package_folder_without_init_is_refused_not_dropped(tmp_path):
    from ftflow.stages.caching import PackageWithoutInit

    write_package(tmp_path, {"pkg/__init__.py": "", "pkg/stage.py": "from pkg.sub import deep\n",
                             "pkg/sub/deep.py": "X = 1\n"})
    with pytest.raises(PackageWithoutInit, match=r"pkg/sub holds modules but no __init__.py"):
        reached_modules(["pkg.stage"], search_path=[tmp_path])
    (tmp_path / "pkg" / "sub" / "__init__.py").write_text('"""A sub-package."""\n')
    assert reached_modules(["pkg.stage"], search_path=[tmp_path]) == ("pkg", "pkg.stage", "pkg.sub", "pkg.sub.deep")



def test_imports_of_a_main_block_are_no_edge(tmp_path):
    # `python -m pkg.stage` runs that block in a module named __main__; importing pkg.stage never does.
    write_package(tmp_path, {"pkg/__init__.py": "", "pkg/cli.py": "import pkg.stage\n",
                             "pkg/stage.py": "X = 1\nif __name__ == '__main__':\n    from pkg.cli import main\n"})
    assert reached_modules(["pkg.stage"], search_path=[tmp_path]) == ("pkg", "pkg.stage")
    assert reached_modules(["pkg.cli"], search_path=[tmp_path]) == ("pkg", "pkg.cli", "pkg.stage")
