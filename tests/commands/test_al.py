"""`gradnorm-engine al`, `report` and `demo` from the command line: a tiny run, and exit 2 on bad input."""
import json

import pytest

from gradnorm_engine.cli import main


pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--dataset", "digits", "--initial", "20", "--budget", "10", "--subset", "30", "--cycles", "2",
        "--trials", "1", "--epochs", "1", "--width", "4", "--no-progress"]


def test_al_then_report(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["al", *TINY, "--strategies", "entropy,random", "--out", str(out), "--no-report"]) == 0
    records = [json.loads(line) for line in open(out / "results.jsonl")]
    assert [(r["strategy"], r["labeled"]) for r in records] == [("entropy", 20), ("entropy", 30), ("random", 20),
                                                                 ("random", 30)]
    assert main(["al", *TINY, "--cycles", "3", "--strategies", "entropy,random", "--out", str(out), "--resume",
                 "--no-report"]) == 0
    records = [json.loads(line) for line in open(out / "results.jsonl")]
    assert [r["labeled"] for r in records if r["strategy"] == "random"] == [20, 30, 40]
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "entropy (1)" in printed
    for name in ("curves.png", "times.png", "per_class.png", "summary.md"):
        assert (out / name).exists()


@pytest.mark.parametrize("argv, message", [
    (["--dataset", "mnist"], "unknown dataset 'mnist'"),
    (["--strategies", "lplgrad,bald"], "unknown strategy 'bald'"),
    (["--budget", "40"], "larger than --subset"),
    (["--subset", "1430"], "larger than the unlabeled pool"),
    (["--dataset", "caltech101", "--data", "/nonexistent/caltech"], "does not exist"),
    (["--dataset", "cdd"], "--data"),
    (["--preset", "huge"], "unknown preset"),
    (["--backend", "nope"], "unknown backend 'nope'"),
    (["--width", "0"], "--width must be at least 1"),
    (["--milestones", "a,b"], "comma-separated integers"),
    (["--device", "tpu9"], "unknown device"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, argv, message):
    args = ["al", *TINY, "--out", str(tmp_path / "x"), *argv]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_non_image_data_exits_2(tmp_path, capsys):
    (tmp_path / "docs" / "a").mkdir(parents=True)
    (tmp_path / "docs" / "a" / "notes.txt").write_text("text")
    assert main(["al", *TINY, "--dataset", "folder", "--data", str(tmp_path / "docs"), "--out", str(tmp_path / "o")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_report_of_a_missing_run_exits_2(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "results.jsonl" in capsys.readouterr().err


def test_demo_small(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--trials", "1", "--cycles", "1", "--epochs", "1"]) == 0
    printed = capsys.readouterr().out
    assert "engine check" in printed and "loop" in printed and "vmap" in printed
    assert "lplgrad (1)" in printed and "random (1)" in printed
    assert (out / "results.jsonl").exists() and (out / "curves.png").exists()
    # a rerun replaces the demo's own results
    assert main(["demo", "--out", str(out), "--trials", "1", "--cycles", "1", "--epochs", "1",
                 "--skip-engine-check"]) == 0
    assert len(open(out / "results.jsonl").readlines()) == 4
    # a folder holding someone else's run is left alone
    other = tmp_path / "other"
    assert main(["al", *TINY, "--cycles", "1", "--strategies", "random", "--out", str(other), "--no-report"]) == 0
    assert main(["demo", "--out", str(other), "--skip-engine-check", "--cycles", "1", "--epochs", "1"]) == 2


def test_al_under_torchrun_runs_on_two_ranks_and_rank0_writes_and_prints(tmp_path):
    """`torchrun -m gradnorm_engine.cli al` (gloo on CPU): the group is started by the command,
    the loop runs on both ranks, one set of files and one printed table come out."""
    import os
    import subprocess
    import sys

    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "gradnorm_engine.cli",
         "al", *TINY, "--strategies", "ent-gradnorm", "--out", str(out), "--no-report", "--device", "cpu"],
        capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("ent-gradnorm trial 1 cycle 1:") == 1, done.stdout
    assert done.stdout.count("strategy (trials)") == 1, done.stdout
    records = [json.loads(line) for line in open(out / "results.jsonl")]
    assert [(r["strategy"], r["labeled"]) for r in records] == [("ent-gradnorm", 20), ("ent-gradnorm", 30)]


def test_demo_refuses_bad_settings_before_any_work(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--cycles", "0", "--out", str(out)]) == 2
    assert "--cycles must be at least 1" in capsys.readouterr().err
    assert not out.exists()
    (tmp_path / "afile").write_text("")
    assert main(["demo", "--out", str(tmp_path / "afile")]) == 2
    assert "is a file" in capsys.readouterr().err
