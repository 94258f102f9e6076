"""benchmarks/gpu_session.py: the GPU session rehearsed on the CPU, every stage end to end at
tiny shapes, as the device will run it: without ``datasets`` (the device has none, and
sparsify's package imports it), so that only the device is new on the day."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_session.py"


def session_module():
    spec = importlib.util.spec_from_file_location("gpu_session", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_session(tmp_path: Path, *flags: str) -> tuple[subprocess.CompletedProcess, dict]:
    """The script in a process of its own, with ``import datasets`` failing as on the device."""
    blocked = tmp_path / "no_datasets"
    blocked.mkdir()
    (blocked / "datasets.py").write_text("raise ImportError('datasets: not on the device')\n")
    env = {**__import__("os").environ, "PYTHONPATH": str(blocked)}
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out), *flags],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=900,
    )
    path = out / "gpu_session.json"
    assert path.exists(), (
        f"no report (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return proc, json.loads(path.read_text())


@pytest.mark.slow
def test_the_rehearsal_runs_every_stage_without_datasets(tmp_path):
    # a budget for a loaded 2-core machine: nothing here is timed against a target
    proc, report = run_session(tmp_path, "--rehearse", "--budget", "900")
    assert proc.returncode == 0, proc.stdout[-4000:]
    stages = report["stages"]
    assert list(stages) == ["versions", "encoder", "sae_step", "profile", "end_to_end", "tests"]
    assert all(s["status"] == "ok" for s in stages.values()), stages
    info = stages["versions"]["info"]
    assert "sparse_coder alone" in info["sparsify_import"], info  # its __init__ needs datasets
    for row in stages["encoder"]["rows"]:  # every case measured, no error text
        assert isinstance(row["fused_ms"], float) and isinstance(row["cublas_topk_ms"], float), row
    assert {r["k_aux"] > 0 for r in stages["encoder"]["rows"]} == {False, True}
    step_rows = stages["sae_step"]["rows"]
    assert {r["impl"].split()[0] for r in step_rows} == {"gsae", "sparsify"}
    assert all(isinstance(r["ms"], float) for r in step_rows), step_rows
    # each tool's default optimiser and both under Adam, each gsae row against its sparsify peer
    impls = {r["impl"] for r in step_rows}
    assert {"sparsify signum bf16 autocast", "sparsify adam bf16 autocast"} <= impls, impls
    assert {"gsae signum auto", "gsae adam auto", "gsae adam fp32"} <= impls, impls
    assert all(r["speedup_vs_sparsify"] for r in step_rows if r["impl"].startswith("gsae"))
    notes = " ".join(stages["sae_step"]["notes"])  # the roofline, from peaks measured here
    assert "% of the limit" in notes and "roofline: GEMM" in notes, notes
    e2e = {r["impl"]: r for r in stages["end_to_end"]["rows"]}
    assert set(e2e) == {"gsae auto", "gsae per-layer", "sparsify"}
    for impl, row in e2e.items():
        assert row["status"] == "ok" and row["tokens_per_s"] > 0, (impl, row)
    assert e2e["gsae per-layer"]["saes"] == e2e["sparsify"]["saes"] == 4  # the tiny model's depth
    assert "gsae auto at" in " ".join(stages["end_to_end"]["notes"])  # the ratio to sparsify
    assert stages["tests"]["pytest_exit"] == 0 and stages["tests"]["rows"]  # collected, skipped
    markdown = (tmp_path / "out" / "gpu_session.md").read_text()
    for name in stages:
        assert f"## {name}: ok" in markdown
    assert "| gsae per-layer |" in markdown


@pytest.mark.slow
def test_a_stage_over_its_box_is_stopped_and_the_others_still_run(tmp_path):
    proc, report = run_session(
        tmp_path, "--rehearse", "--only", "encoder,versions", "--box", "encoder=1"
    )
    stages = report["stages"]
    assert proc.returncode == 1  # a stage was not ok
    assert stages["encoder"]["status"].startswith("over its time box"), stages["encoder"]
    assert stages["encoder"]["seconds"] < 15
    assert stages["versions"]["status"] == "ok" and stages["versions"]["info"]["torch"]
    assert "## encoder: over its time box" in (tmp_path / "out" / "gpu_session.md").read_text()


def test_unknown_stages_are_refused(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path), "--only", "encoder,warp"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 2 and "unknown stages ['warp']" in proc.stderr


def test_peaks_by_device_name_and_the_roofline():
    gs = session_module()
    assert gs.table_peaks("NVIDIA H200")["peak_tb_s"] == 4.8
    assert gs.table_peaks("NVIDIA GH200 480GB")["peak_tb_s"] == 4.0
    assert gs.table_peaks("NVIDIA H100 PCIe")["peak_bf16_tflops"] == 756.0
    assert gs.table_peaks("NVIDIA H100 80GB HBM3")["peak_tb_s"] == 3.35
    assert gs.table_peaks("AMD Instinct MI250X")["peak_bf16_tflops"] == 191.5
    assert gs.table_peaks("Some Future GPU") is None  # then measured on the device
    limit = gs.roofline_ms(gs.PAPER, 989.0, 4.8)
    # 2 N d m = 4.398e12 FLOP at 989 TFLOP/s; 3 N k d bf16 elements = 51.5 GB at 4.8 TB/s
    assert limit["gemm_ms"] == pytest.approx(4.447, rel=1e-3)
    assert limit["decode_ms"] == pytest.approx(10.74, rel=1e-3)
    assert limit["limit_ms"] == pytest.approx(limit["gemm_ms"] + limit["decode_ms"])


def test_the_wheels_script_and_the_device_command_agree():
    wheels = (ROOT / "benchmarks" / "gpu_wheels.sh").read_text()
    session = (ROOT / "benchmarks" / "gpu_session.sh").read_text()
    assert "eai-sparsify" in wheels and ".gpu_wheels" in wheels and "64 * 1024 * 1024" in wheels
    assert "wheels=.gpu_wheels" in session and "--no-index" in session
    assert "/.gpu_wheels/" in (ROOT / ".gitignore").read_text().splitlines()
