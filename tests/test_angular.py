"""The angular-distance op: C++ extension and torch path against a float64 brute force; the
extension's first build under Ctrl-C, after a killed build and beside a stale lock."""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from gsae import angular
from gsae.angular import angular_distance_sums, angular_distance_sums_torch, load_extension

REQUIRE = os.environ.get("GSAE_REQUIRE_EXT", "0") not in ("", "0")


def brute_force(hidden: torch.Tensor) -> torch.Tensor:
    """float64 arccos of cosines, per token, summed: the definition (paper Eq. 11) verbatim."""
    x = hidden.double()
    norm = x.norm(dim=2, keepdim=True)
    unit = torch.where(norm > 0, x / norm, 0.0)  # a zero vector: cos = 0, distance 1/2
    cos = torch.einsum("lnd,mnd->nlm", unit, unit).clamp(-1, 1)  # [N, L, L]
    sums = torch.arccos(cos).sum(0) / torch.pi
    return sums.fill_diagonal_(0.0)


def related_layers(layers, n, d, dtype, seed=0):
    """Hidden states like a residual stream: each layer adds a little to the previous one, so
    the distances span near-parallel pairs (the hard case for arccos) to far apart ones."""
    g = torch.Generator().manual_seed(seed)
    x = [torch.randn(n, d, generator=g) + 2.0]
    for _ in range(layers - 1):
        x.append(x[-1] + 0.3 * torch.randn(n, d, generator=g))
    return torch.stack(x).to(dtype)


@pytest.fixture(scope="module")
def ext():
    if not load_extension():
        if REQUIRE:
            pytest.fail("GSAE_REQUIRE_EXT is set but the extension did not load")
        pytest.skip("the C++ extension could not be built here")
    return torch.ops.gsae.angular_distance_sums


def test_extension_builds_when_required():
    """CI sets GSAE_REQUIRE_EXT=1: there the extension, not the fallback, is what is tested."""
    if REQUIRE:
        assert load_extension()


SHAPES = [(1, 7, 16), (2, 33, 63), (5, 100, 63), (12, 257, 128)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layers,n,d", SHAPES)
def test_extension_and_torch_match_float64(ext, dtype, layers, n, d):
    hidden = related_layers(layers, n, d, dtype)
    want = brute_force(hidden)  # on the same (rounded) values
    sums, count = ext(hidden)
    assert sums.dtype == torch.float64 and sums.shape == (layers, layers)
    assert int(count) == n
    torch.testing.assert_close(sums / n, want / n, rtol=0, atol=2e-6)
    sums_t, count_t = angular_distance_sums_torch(hidden)
    torch.testing.assert_close(sums_t / n, want / n, rtol=0, atol=2e-6)
    assert int(count_t) == n
    assert torch.equal(sums, sums.T)


def test_nearly_parallel_layers_keep_their_precision(ext):
    """Distances of 1e-4 (cos = 0.99999995): arccos of an fp32 dot product would be off by
    most of that; the chord formula is not."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(64, 512, generator=g)
    hidden = torch.stack([base, base + 3e-4 * torch.randn(64, 512, generator=g)])
    want = brute_force(hidden)[0, 1] / 64
    got = ext(hidden)[0][0, 1] / 64
    assert abs(float(got - want)) < 1e-3 * float(want)


def test_result_is_deterministic_and_thread_independent(ext):
    hidden = related_layers(6, 1000, 64, torch.float32)
    first = ext(hidden)[0]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = ext(hidden)[0]
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(first, ext(hidden)[0])
    assert torch.equal(first, single)


def test_empty_batch_and_zero_vectors(ext):
    sums, count = ext(torch.zeros(3, 0, 8))
    assert int(count) == 0 and torch.equal(sums, torch.zeros(3, 3, dtype=torch.float64))
    hidden = torch.randn(3, 4, 8)
    hidden[0, 1] = 0.0  # no direction: counted as orthogonal (distance 1/2) to everything,
    hidden[1, 2] = hidden[2, 2] = 0.0  # another zero vector included
    want = brute_force(hidden)
    assert float(want[0, 1]) > 0.5  # the rule is in play
    torch.testing.assert_close(ext(hidden)[0], want, atol=1e-6, rtol=0)
    torch.testing.assert_close(angular_distance_sums_torch(hidden)[0], want, atol=1e-6, rtol=0)


def test_bad_inputs_are_rejected_with_clear_messages(ext):
    with pytest.raises(RuntimeError, match=r"hidden must be \[L, N, d\], got 2-D"):
        ext(torch.randn(4, 8))
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16, got Double"):
        ext(torch.randn(2, 3, 4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="must be contiguous"):
        ext(torch.randn(2, 8, 3).transpose(1, 2))
    with pytest.raises(RuntimeError, match="L >= 1 and d >= 1"):
        ext(torch.randn(0, 3, 4))
    # the Python entry point checks first, with ValueErrors
    with pytest.raises(ValueError, match=r"must be a \[L, N, d\] tensor, got \(4, 8\)"):
        angular_distance_sums(torch.randn(4, 8))
    with pytest.raises(ValueError, match="got torch.int64"):
        angular_distance_sums(torch.ones(2, 3, 4, dtype=torch.int64))
    # non-contiguous input is fine through the Python entry point
    hidden = torch.randn(3, 8, 10).transpose(1, 2).contiguous().transpose(1, 2)
    torch.testing.assert_close(
        angular_distance_sums(hidden)[0], brute_force(hidden), atol=1e-6, rtol=0
    )


def test_opcheck(ext):
    hidden = related_layers(3, 20, 16, torch.float32)
    torch.library.opcheck(ext.default, (hidden,))


def test_nan_inputs_give_nan_distances(ext):
    """A NaN must reach the distance matrix (where grouping refuses it), not pass for a zero
    vector's pi / 2."""
    hidden = related_layers(4, 30, 63, torch.float32)
    hidden[1, 7, 5] = float("nan")
    for sums in (ext(hidden)[0], angular_distance_sums_torch(hidden)[0]):
        nan = sums.isnan()
        assert nan[1].sum() == 3 and nan[:, 1].sum() == 3  # every pair with layer 1
        assert not nan[[0, 2, 3]][:, [0, 2, 3]].any()


_PORTABLE = """
import sys, torch
from gsae.angular import build_extension
build_extension("gsae_ext_portable_test", ())
hidden = torch.load(sys.argv[1])
torch.save(torch.ops.gsae.angular_distance_sums(hidden)[0], sys.argv[2])
"""


@pytest.mark.slow
def test_portable_build_without_avx512_matches(ext, tmp_path):
    """Built without -march (x86-64 baseline, or any other CPU), the extension takes its
    portable omp-simd kernel instead of the AVX-512 one; it must agree with the definition."""
    import subprocess
    import sys

    hidden = related_layers(6, 50, 63, torch.float32)
    torch.save(hidden, tmp_path / "in.pt")
    cmd = [sys.executable, "-c", _PORTABLE, str(tmp_path / "in.pt"), str(tmp_path / "out.pt")]
    subprocess.run(cmd, check=True, timeout=600)
    sums = torch.load(tmp_path / "out.pt")
    torch.testing.assert_close(sums / 50, brute_force(hidden) / 50, rtol=0, atol=2e-6)


def test_failed_build_warns_once_and_falls_back(monkeypatch):
    from torch.utils import cpp_extension

    def broken(*_a, **_k):
        raise OSError("no compiler")

    monkeypatch.setattr(cpp_extension, "load", broken)
    monkeypatch.delenv("GSAE_REQUIRE_EXT", raising=False)
    angular.load_extension.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="could not be built.*no compiler"):
            assert angular.load_extension() is False
        monkeypatch.setenv("GSAE_REQUIRE_EXT", "1")
        angular.load_extension.cache_clear()
        with pytest.raises(RuntimeError, match="GSAE_REQUIRE_EXT is set"):
            angular.load_extension()
    finally:
        angular.load_extension.cache_clear()


@pytest.mark.gpu
def test_gpu_tensors_stay_on_the_gpu():
    hidden = related_layers(4, 300, 64, torch.bfloat16).cuda()
    sums, count = angular_distance_sums(hidden)
    assert sums.is_cuda
    torch.testing.assert_close(sums.cpu() / 300, brute_force(hidden.cpu()) / 300, atol=2e-6, rtol=0)


# ---- the C++ extension's first build


def test_a_ctrl_c_during_the_build_stops_the_command(monkeypatch, tmp_path):
    from torch.utils import cpp_extension

    from gsae import angular

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))

    def interrupted(**kwargs):
        raise RuntimeError(
            "Error building extension 'x': ninja: build stopped: interrupted by user."
        )

    monkeypatch.setattr(cpp_extension, "load", interrupted)
    monkeypatch.delenv(angular.ENV_DISABLE, raising=False)
    angular.load_extension.cache_clear()
    try:
        with pytest.raises(KeyboardInterrupt):
            angular.load_extension()  # not a warning and the torch path
    finally:
        angular.load_extension.cache_clear()
    assert not list(tmp_path.rglob(angular.OWNER_PREFIX + "*"))  # its record is removed


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_lock_left_by_a_killed_build_is_cleared(tmp_path):
    import socket

    from gsae.angular import OWNER_PREFIX, clear_stale_lock

    (tmp_path / "lock").touch()
    (tmp_path / f"{OWNER_PREFIX}{socket.gethostname()}.{_dead_pid()}").touch()
    started = time.perf_counter()
    clear_stale_lock(tmp_path)
    assert time.perf_counter() - started < 1
    assert not (tmp_path / "lock").exists() and not list(tmp_path.iterdir())


def test_a_lock_nobody_owns_is_named_once_it_is_old(tmp_path):
    from gsae.angular import ExtensionLockError, clear_stale_lock

    lock = tmp_path / "lock"
    lock.touch()
    old = time.time() - 3600
    os.utime(lock, (old, old))
    with pytest.raises(ExtensionLockError, match=f"rm {lock}"):
        clear_stale_lock(tmp_path, stale_after=300)
    assert lock.exists()  # not ours to remove: another machine may be building


def test_a_lock_of_a_running_build_is_waited_for(tmp_path, capsys):
    import socket

    from gsae.angular import OWNER_PREFIX, clear_stale_lock

    lock = tmp_path / "lock"
    lock.touch()
    (tmp_path / f"{OWNER_PREFIX}{socket.gethostname()}.{os.getpid()}").touch()  # running
    threading.Timer(0.5, lock.unlink).start()  # that build finishes
    started = time.perf_counter()
    clear_stale_lock(tmp_path, stale_after=0, poll=0.05)
    assert time.perf_counter() - started >= 0.4
    assert "waiting for another process" in capsys.readouterr().err


def test_the_extension_failing_on_a_stale_lock_names_it(monkeypatch, tmp_path):
    from gsae import angular

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(angular, "LOCK_STALE_AFTER", 0.0)
    monkeypatch.delenv(angular.ENV_DISABLE, raising=False)
    monkeypatch.delenv(angular.ENV_REQUIRE, raising=False)
    folder = tmp_path / f"gsae_ext_{angular._cpu_tag()}"
    folder.mkdir()
    (folder / "lock").touch()
    angular.load_extension.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match=f"rm {folder / 'lock'}"):
            assert angular.load_extension() is False  # the torch path, not a hang
    finally:
        angular.load_extension.cache_clear()


@pytest.mark.slow
def test_a_build_killed_midway_does_not_hang_the_next_one(tmp_path):
    """The hang's reproduction: a fresh TORCH_EXTENSIONS_DIR, a SIGKILL during the build, then
    a second build: it must finish (it hung at "distances 0%" forever)."""
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path), "GSAE_REQUIRE_EXT": "1"}
    env.pop("GSAE_DISABLE_EXT", None)
    code = "from gsae.angular import load_extension; print(load_extension())"
    first = subprocess.Popen([sys.executable, "-c", code], env=env)
    deadline = time.time() + 120
    while not list(tmp_path.glob("*/lock")) and time.time() < deadline:
        time.sleep(0.1)
    assert list(tmp_path.glob("*/lock")), "the build never started"
    time.sleep(2)  # inside the compiler
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert list(tmp_path.glob("*/lock"))  # left behind, as torch leaves it
    second = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600
    )
    assert second.returncode == 0 and second.stdout.strip() == "True", second.stderr
