"""Writes that appear whole or not at all (:mod:`gsae.io`): a Ctrl-C or a kill during a swap
leaves the old copy, and the next write recovers from the journal alone."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from tiny import small_config

from gsae.io import atomic_dir
from gsae.sae import Sae


def test_interrupted_save_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    sae = Sae(small_config())
    sae.save(tmp_path / "sae")
    with torch.no_grad():
        sae.W_enc.add_(1.0)

    original = Sae.save_files

    def write_then_crash(self, directory):
        original(self, directory)
        raise KeyboardInterrupt  # Ctrl-C after the files are written, before the swap

    monkeypatch.setattr(Sae, "save_files", write_then_crash)
    with pytest.raises(KeyboardInterrupt):
        sae.save(tmp_path / "sae")
    back = Sae.load(tmp_path / "sae")
    assert not torch.equal(back.W_enc, sae.W_enc)  # the old weights, intact
    assert [p.name for p in tmp_path.iterdir()] == ["sae"]  # no temp files left behind


def test_a_users_folder_named_like_an_old_copy_is_left_alone(tmp_path):
    """Swaps are recovered from their journal only (the test below kills one half-way):
    a folder ``sae.old`` of the user's is neither taken for the SAE nor deleted."""
    sae = Sae(small_config())
    sae.save(tmp_path / "sae")
    os.replace(tmp_path / "sae", tmp_path / "sae.old")  # the user's copy
    with pytest.raises(FileNotFoundError):
        Sae.load(tmp_path / "sae")
    assert (tmp_path / "sae.old" / "cfg.json").exists()
    with atomic_dir(tmp_path / "x") as d:
        (d / "f").write_text("1")
    assert (tmp_path / "x" / "f").read_text() == "1"


@pytest.mark.parametrize("crash_at", [1, 2])
def test_a_swap_killed_between_its_renames_is_recovered_from_its_journal(tmp_path, crash_at):
    """A process killed (os._exit: no clean-up runs) right after its crash_at-th rename; the
    next writer finds one whole copy under the name, old or new, and no leftovers."""
    target = tmp_path / "out"
    with atomic_dir(target) as d:
        (d / "v").write_text("old")
    script = textwrap.dedent(f"""
        import os
        from gsae.io import atomic_dir
        real, n = os.replace, [0]
        def replace(a, b):
            real(a, b)
            n[0] += 1
            if n[0] == {crash_at}:
                os._exit(3)
        os.replace = replace
        with atomic_dir({str(target)!r}) as d:
            (d / "v").write_text("new")
    """)
    assert subprocess.run([sys.executable, "-c", script]).returncode == 3
    with atomic_dir(target) as d:  # the next write recovers first
        (d / "v").write_text("next")
    assert (target / "v").read_text() == "next"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
