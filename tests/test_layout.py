"""The shape of the code (issue 9): data flows one way."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imports(path: Path) -> set[str]:
    """Absolute names of the modules ``path`` imports (relative imports resolved)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(x for x in (base, node.module) if x)
            names.add(module)
            names |= {f"{module}.{a.name}" for a in node.names}
    return names


def test_library_modules_never_import_a_command_module():
    library = [p for p in (ROOT / "gsae").rglob("*.py") if "cli" not in p.relative_to(ROOT).parts]
    offenders = {str(p.relative_to(ROOT)): sorted(n for n in imports(p) if n.startswith("gsae.cli"))
                 for p in library}  # fmt: skip
    assert not {k: v for k, v in offenders.items() if v}


def test_only_activations_touches_transformers_and_datasets():
    library = [p for p in (ROOT / "gsae").rglob("*.py") if "demo" not in p.parts]
    heavy = ("transformers", "datasets")
    offenders = sorted(str(p.relative_to(ROOT)) for p in library if p.name != "activations.py"
                       and any(n.split(".")[0] in heavy for n in imports(p)))  # fmt: skip
    assert not offenders


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
