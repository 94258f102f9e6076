"""gsae-browse refuses bad input before any work."""

from gsae.cli.browse import main


def test_browse_refuses_bad_input_before_any_work(trained_runs, tmp_path, capsys):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    run = str(trained_runs["grouped"])
    cases = [
        ([run, "--out", str(trained_runs["per-layer"])], "gsae-train run"),
        ([run, "--out", str(foreign)], "did not write"),
        ([run, "--out", str(tmp_path / "a"), "--tokens", "0"], "--tokens must be > 0"),
        ([run, "--out", str(tmp_path / "b"), "--baseline", run], "not a per-layer run"),
        ([run, "--out", str(tmp_path / "c"), "--window", "0"], "--window must be >= 1"),
        ([str(tmp_path), "--out", str(tmp_path / "d")], "not a gsae-train output"),
    ]
    for argv, message in cases:
        assert main([*argv, "--device", "cpu"]) == 2
        assert message in capsys.readouterr().err
    assert (foreign / "keep.txt").read_text() == "mine"
