"""The shape of the code: data flows one way, and nothing at the root shadows another package."""

import ast
import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _type_checking_only(tree: ast.AST) -> set[int]:
    """ids of the nodes under ``if TYPE_CHECKING:`` (imported by type checkers, never run)."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for child in node.body for n in ast.walk(child)}
    return skip


def import_statements(path: Path, runtime: bool = False) -> list[tuple[str, list[str]]]:
    """``(module, names)`` of each import in ``path``, relative ones resolved: ``import a.b`` is
    ``("a.b", [])``, ``from .x import f`` in gsae/y.py is ``("gsae.x", ["f"])``. ``runtime``:
    only those that run (not the ones under ``if TYPE_CHECKING:``)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = []
    tree = ast.parse(path.read_text())
    skip = _type_checking_only(tree) if runtime else set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(x for x in (base, node.module) if x)
            found.append((module, [a.name for a in node.names]))
    return found


def imports(path: Path) -> set[str]:
    """Absolute names of the modules ``path`` imports (relative imports resolved), and of what
    it imports from them (``gsae.x.f``)."""
    found = set()
    for module, names in import_statements(path):
        found |= {module, *(f"{module}.{name}" for name in names)}
    return found


def test_library_modules_never_import_a_command_module():
    library = [p for p in (ROOT / "gsae").rglob("*.py") if "cli" not in p.relative_to(ROOT).parts]
    offenders = {
        str(p.relative_to(ROOT)): sorted(n for n in imports(p) if n.startswith("gsae.cli"))
        for p in library
    }
    assert not {k: v for k, v in offenders.items() if v}


def test_command_modules_import_only_the_library():
    """A command's module imports no other command's (only gsae.cli.common, their shared flags):
    what two commands share lives in the library or in common."""
    commands = [p for p in (ROOT / "gsae" / "cli").glob("*.py") if p.stem != "__init__"]
    offenders = {
        p.name: sorted(
            n
            for n in imports(p)
            if n.startswith("gsae.cli.") and n.split(".")[2] not in ("common", p.stem)
        )
        for p in commands
    }
    assert not {k: v for k, v in offenders.items() if v}


def module_graph() -> dict[str, set[str]]:
    """Each gsae module and the gsae modules it imports when it runs, anywhere in it: ``from .x
    import f`` is an edge to ``x``, ``from . import x`` to ``x`` (not to the package)."""
    files = {}
    for path in (ROOT / "gsae").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in files.items():
        found = set()
        for module, names in import_statements(path, runtime=True):
            inside = {f"{module}.{n}" for n in names} & set(files)  # from a package, a module
            found |= inside if len(inside) == len(names) > 0 else {module, *inside}
        graph[name] = {n for n in found if n in files and n != name}
    return graph


def test_gsae_has_no_import_cycle():
    graph, done, path = module_graph(), set(), []

    def visit(name):  # depth first: a module met again on the current path closes a cycle
        if name in path:
            raise AssertionError(" -> ".join([*path[path.index(name) :], name]))
        if name in done:
            return
        path.append(name)
        for other in sorted(graph[name]):
            visit(other)
        path.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)


def test_only_gsae_hf_touches_transformers_and_datasets():
    library = [p for p in (ROOT / "gsae").rglob("*.py") if "demo" not in p.parts]
    heavy = ("transformers", "datasets")
    offenders = sorted(
        str(p.relative_to(ROOT))
        for p in library
        if "hf" not in p.parts and any(n.split(".")[0] in heavy for n in imports(p))
    )
    assert not offenders


def test_the_core_never_imports_training_evaluation_or_commands():
    """gsae.sae, gsae.init, gsae.io, gsae.device and gsae.hf sit below the training run: the
    arrow points from gsae.train to them, never back (the trainer lives in gsae.train.step)."""
    core = [ROOT / "gsae" / f"{name}.py" for name in ("sae", "init", "io", "device")]
    core += list((ROOT / "gsae" / "hf").glob("*.py"))
    above = ("gsae.train", "gsae.eval", "gsae.cli", "gsae.browse", "gsae.autointerp")
    offenders = [(str(p.relative_to(ROOT)), n) for p in core for n in imports(p)]
    assert not [(path, name) for path, name in offenders if name.startswith(above)]


def test_plots_leave_the_matplotlib_backend_alone(tmp_path):
    import matplotlib

    before = matplotlib.get_backend()
    matplotlib.use("pdf")
    try:
        from gsae import plots

        plots.distance_heatmap([[0, 0.1], [0.1, 0]], [0, 1], tmp_path / "d.png")
        plots.amad_curve({1: 0.3, 2: 0.1}, 2, 0.2, tmp_path / "a.png")
        assert matplotlib.get_backend() == "pdf"  # a notebook's backend stays as it was
        for name in ("d.png", "a.png"):
            assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    finally:
        matplotlib.use(before)


# run from the repository root, where `python -m`, notebooks and scripts put it first on sys.path
_SHADOW_PROBE = """
import importlib.metadata, importlib.util, json, os, sys
root = os.path.realpath(os.getcwd())
owned = importlib.metadata.packages_distributions()
found = {}
for entry in sorted(os.listdir(root)):
    name = entry[:-3] if entry.endswith(".py") else entry
    if not name.isidentifier():
        continue
    spec = importlib.util.find_spec(name)
    origin = spec and spec.origin and os.path.realpath(spec.origin)
    mine = os.path.join(root, entry)  # the root's own file or folder, not a venv inside it
    at_root = bool(origin) and (origin == mine or origin.startswith(mine + os.sep))
    found[name] = {"origin": origin, "at_root": at_root, "owners": owned.get(name, [])}
print(json.dumps(found))
"""


def test_nothing_at_the_root_is_importable_under_another_packages_name():
    """A root folder with an ``__init__.py`` hides any installed package of the same name from
    code run at the root: ``kernels/`` once hid Hugging Face's ``kernels``, which transformers
    imports, and every model load failed under ``python -m pytest``. Only ``gsae`` may be a
    module or package at the root; every name an installed distribution owns resolves to it."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    probe = [sys.executable, "-c", _SHADOW_PROBE]
    out = subprocess.run(probe, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    found = json.loads(out.stdout)
    assert not {n: f for n, f in found.items() if f["at_root"] and n != "gsae"}
    assert found["kernels"]["origin"] is None or not found["kernels"]["at_root"]
    for name, f in found.items():
        if f["owners"] and name != "gsae":
            assert not f["at_root"], (name, f)


def test_import_kernels_at_the_root_gets_hugging_faces_package():
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's kernels is not installed")
    code = "import kernels, sys; print(kernels.__file__); print(kernels.__spec__.origin)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    path = Path(out.stdout.splitlines()[0]).resolve()
    assert ROOT / "kernels" not in path.parents, path
    # and transformers' own import of it works from here
    code = "from transformers.integrations import hub_kernels"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]


def test_only_gsae_run_names_the_files_of_a_run_folder():
    """One place names what gsae-train writes (run.json, scales.json, log.jsonl, the checkpoint
    folders and their manifest): every other module takes the names from :mod:`gsae.run`, so
    that the trainer and the readers of a run (eval, export, inference, browse) cannot drift."""
    from gsae import run

    names = {run.RUN_FILE, run.SCALES_FILE, run.LOG_FILE, run.MANIFEST, *run.CHECKPOINTS}
    offenders = {}
    for path in (ROOT / "gsae").rglob("*.py"):
        if path == ROOT / "gsae" / "run.py":
            continue
        tree = ast.parse(path.read_text())
        found = {
            n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and n.value in names
        }
        if found:
            offenders[str(path.relative_to(ROOT))] = sorted(found)
    assert not offenders


def test_each_test_folder_mirrors_a_package_of_the_code():
    """tests/<area>/ holds the tests of one package: ``kernels`` (gsae_kernels) or a gsae
    subpackage; the tests of gsae's top-level modules and of the repository as a whole sit in
    tests/ itself, beside the shared helpers (tiny.py, tolerances.py, ...)."""
    packages = {"kernels"} | {
        p.name for p in (ROOT / "gsae").iterdir() if (p / "__init__.py").exists()
    }
    areas = {p.name for p in (ROOT / "tests").iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert areas <= packages, sorted(areas - packages)


def test_every_test_file_a_page_or_a_module_names_exists():
    """A pointer to a test (``tests/<area>/test_x.py``) in the docs, the code or the tests names a
    file that exists: moving a test must not leave its old path behind."""
    sources = [ROOT / "README.md", ROOT / ".ci" / "run", *(ROOT / "docs").glob("*.md")]
    for folder in ("gsae", "kernels", "csrc", "benchmarks", "tests"):
        sources += (ROOT / folder).rglob("*.py")
    named = {
        (str(path.relative_to(ROOT)), found)
        for path in sources
        for found in re.findall(r"\btests/[\w/]+\.py\b", path.read_text())
    }
    assert named and not sorted(
        (path, found) for path, found in named if not (ROOT / found).is_file()
    )
