"""Reports from results.jsonl: table values (mean +- std by hand), figures and summary written."""
import json

import pytest

from gradnorm_engine.al.report import accuracy_table, mean_std, per_class_means, time_table, write_report


def _records():
    rows = []
    for trial, accs in [(1, [50.0, 70.0]), (2, [54.0, 74.0])]:
        for cycle, acc in enumerate(accs, 1):
            rows.append({"strategy": "lplgrad", "trial": trial, "cycle": cycle, "labeled": 100 * cycle,
                         "test_acc": acc, "per_class_acc": [acc - 1, acc + 1, None], "train_s": 2.0, "query_s": 0.5,
                         "queried": [], "dataset": "digits"})
            rows.append({"strategy": "random", "trial": trial, "cycle": cycle, "labeled": 100 * cycle,
                         "test_acc": acc - 4, "per_class_acc": [acc, acc, acc], "train_s": 1.0, "query_s": 0.0,
                         "queried": [], "dataset": "digits"})
    return rows


def test_mean_std_uses_the_sample_std():
    assert mean_std([50.0, 54.0]) == pytest.approx((52.0, 2.8284271))
    assert mean_std([3.0]) == (3.0, 0.0)


def test_accuracy_table_by_hand():
    md = accuracy_table(_records())
    lines = md.splitlines()
    assert lines[0] == "| strategy (trials) | 100 | 200 |"
    assert lines[2] == "| lplgrad (2) | 52.0 ± 2.8 | 72.0 ± 2.8 |"
    assert lines[3] == "| random (2) | 48.0 ± 2.8 | 68.0 ± 2.8 |"
    text = accuracy_table(_records(), fmt="text")
    assert "52.0 +- 2.8" in text and "random (2)" in text


def test_time_table_and_per_class():
    assert "| lplgrad | 2.00 | 0.50 | 5.0 |" in time_table(_records())
    means = per_class_means(_records(), 200)
    assert means["lplgrad"][:2] == [71.0, 73.0]
    assert means["lplgrad"][2] != means["lplgrad"][2]  # NaN: no test sample of that class


def test_write_report_writes_figures_and_summary(tmp_path):
    with open(tmp_path / "results.jsonl", "w") as f:
        for r in _records():
            f.write(json.dumps(r) + "\n")
    paths = write_report(str(tmp_path))
    for key in ("curves", "times", "per_class", "summary"):
        assert (tmp_path / paths[key].split("/")[-1]).stat().st_size > 0
    assert open(paths["curves"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    summary = open(paths["summary"]).read()
    assert "| lplgrad (2) | 52.0 ± 2.8 | 72.0 ± 2.8 |" in summary and "![learning curves](curves.png)" in summary


def test_missing_accuracies_are_left_out_and_a_file_dest_is_refused(tmp_path):
    import json

    from gradnorm_engine.errors import UsageError
    from gradnorm_engine.al.report import accuracy_by_size, write_report

    records = [{"strategy": "random", "trial": t, "cycle": 1, "labeled": 20, "test_acc": acc,
                "per_class_acc": [50.0] * 3, "train_s": 1.0, "query_s": 0.1} for t, acc in ((1, 40.0), (2, None))]
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert accuracy_by_size(records)["random"][20] == [40.0]
    assert write_report(str(run))["summary"].endswith("summary.md")
    (tmp_path / "afile").write_text("")
    with pytest.raises(UsageError, match="is a file"):
        write_report(str(run), str(tmp_path / "afile"))


def _write(run, records):
    run.mkdir(exist_ok=True)
    (run / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_a_record_written_twice_is_refused(tmp_path, capsys):
    from gradnorm_engine.cli import main
    from gradnorm_engine.errors import UsageError

    rows = _records()
    rows.append({**rows[2], "test_acc": 99.0})   # lplgrad trial 1 cycle 2 again: another run's record
    _write(tmp_path / "run", rows)
    with pytest.raises(UsageError, match="lplgrad trial 1 cycle 2 twice.*--resume") as err:
        write_report(str(tmp_path / "run"))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run" / "summary.md").exists()
    assert main(["report", str(tmp_path / "run")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


@pytest.mark.parametrize("change, named", [
    ({"train_s": None}, "train_s"), ({"query_s": None}, "query_s"), ({"labeled": None}, "labeled"),
    ({"strategy": None}, "strategy"), ({"trial": None, "cycle": None}, "trial, cycle"),
    ({"per_class_acc": None}, "per_class_acc"), ({"train_s": "slow"}, "train_s"), ({"labeled": 1.5}, "labeled"),
])
def test_a_record_missing_a_field_is_named_in_one_line(tmp_path, capsys, change, named):
    from gradnorm_engine.cli import main
    from gradnorm_engine.errors import UsageError

    rows = _records()
    rows[3] = {k: v for k, v in {**rows[3], **change}.items() if v is not None}
    _write(tmp_path / "run", rows)
    with pytest.raises(UsageError, match=f"record 4 .*{named}") as err:
        write_report(str(tmp_path / "run"))
    assert "\n" not in str(err.value)
    assert main(["report", str(tmp_path / "run")]) == 2
    assert named in capsys.readouterr().err


def test_a_line_that_is_not_an_object_is_named(tmp_path):
    from gradnorm_engine.errors import UsageError

    _write(tmp_path / "run", [*_records()[:2], [1, 2]])
    with pytest.raises(UsageError, match="record 3 .*not a JSON object"):
        write_report(str(tmp_path / "run"))
