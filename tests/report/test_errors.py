"""report.errors: a report on something that is not a run is one error line, exit 2, nothing written."""

from clipft.cli.commands import main


def test_report_on_a_missing_run_is_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such run directory" in err[0] and not list(tmp_path.iterdir())
