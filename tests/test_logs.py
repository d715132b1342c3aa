"""Logs: log.txt holds every record of its stage (those logged before the folder existed too) and the
result tables printed on stdout; a resumed run appends below a separator; in a terminal the held
lines come before the first bar, a line logged under an open bar does not overwrite it, and a closed
bar leaves one line with its total and time."""

import logging

import pytest
from conftest import REPO

import memcirc.logs as logs
from memcirc import artifacts as art
from memcirc.cli import main

CONFIG = str(REPO / "configs" / "testbed.yaml")


@pytest.fixture(autouse=True)
def _fresh_logging():
    yield
    logs.setup_logging("INFO")   # no log.txt of this test stays attached for the next one,
    logs.end_stage_logs()        # nor a backlog of its records


def test_log_txt_of_stages_1_and_2_holds_every_record_and_the_result_table(tmp_path, capsys):
    common = ["--config", CONFIG, "--output-dir", str(tmp_path), "--device", "cpu"]
    assert main("memorization_score", [*common, "--limit", "112", "--metrics", "exact", "token_match"]) == 0
    scored = capsys.readouterr()
    log = (tmp_path / "memorization" / art.LOG_TXT).read_text()
    for needle in ("INFO memcirc.models.loading: loaded testbed", "112 windows from 112 documents"):
        assert needle in log and needle in scored.err   # stderr showed it; the file has it too
    table = scored.out.strip().splitlines()
    assert table[0].split()[:3] == ["group", "n", "exact"] and len(table) == 9   # 7 groups + header + all
    assert "\n".join(table) in log   # verbatim, aligned as on stdout

    assert main("contrastive_dataset", common) == 0
    paired = capsys.readouterr()
    log = (tmp_path / "contrastive" / art.LOG_TXT).read_text()
    assert "loaded testbed" in log and "memorized windows (exact >= 1.0) of 112" in log
    assert paired.out.startswith("contrastive (divergence): ") and paired.out.strip() in log


def test_a_resumed_run_appends_below_a_separator(tmp_path):
    path = tmp_path / art.LOG_TXT
    for i, forced in enumerate([False, False, True]):
        logs.setup_logging("INFO")
        logging.getLogger("memcirc.test").info("before the folder, run %d", i)   # held, not yet in a file
        logs.attach_log_file(path, forced=forced)
        logging.getLogger("memcirc.test").info("after, run %d", i)
    lines = path.read_text().splitlines()
    assert [ln.split(": ", 1)[1] for ln in lines if "memcirc.test" in ln] == [
        f"{when}, run {i}" for i in range(3) for when in ("before the folder", "after")]
    separators = [ln for ln in lines if ln.startswith("-----")]
    assert len(separators) == 2 and "resumed" in separators[0] and "--force" in separators[1]
    assert not lines[0].startswith("-----")   # a first run has none


def test_a_stage_that_never_started_leaves_its_records_behind(tmp_path):
    logs.setup_logging("INFO")
    logging.getLogger("memcirc.test").info("an earlier in-process stage")
    logs.end_stage_logs()
    logs.attach_log_file(tmp_path / art.LOG_TXT)
    logging.getLogger("memcirc.test").info("this stage")
    text = (tmp_path / art.LOG_TXT).read_text()
    assert "this stage" in text and "earlier" not in text


def test_show_prints_exactly_the_text_and_logs_it(tmp_path, capsys):
    logs.setup_logging("WARNING")   # a result is logged whatever the level
    logs.attach_log_file(tmp_path / art.LOG_TXT)
    logs.show("a  b\n1  2")
    logs.show("one line")
    assert capsys.readouterr().out == "a  b\n1  2\none line\n"
    lines = (tmp_path / art.LOG_TXT).read_text().splitlines()
    assert lines[0].endswith("INFO memcirc.results: stdout:") and lines[1:3] == ["a  b", "1  2"]
    assert lines[3].endswith("INFO memcirc.results: one line")


def test_in_a_terminal_held_lines_come_first_and_bars_are_not_overwritten(monkeypatch, capsys):
    monkeypatch.setattr(logs, "_stderr_is_tty", lambda: True)
    monkeypatch.setattr(logs, "DONE_LINE_S", 0.0)
    logs.setup_logging("INFO")
    log = logging.getLogger("memcirc.test")
    log.info("loaded the model")          # held: the inputs are not checked yet (no release_logs)
    assert capsys.readouterr().err == ""
    with logs.Meter("scoring", total=2, unit="batches") as meter:
        meter.update()
        log.info("a line under the bar")
        meter.update()
    err = capsys.readouterr().err
    assert err.index("loaded the model") < err.index("scoring:")   # the held line before the bar
    before, after = err.split(" INFO memcirc.test: a line under the bar\n")
    assert before.rsplit(" ", 1)[-1].startswith("\r") and "scoring:" in after   # bar lifted, line, bar redrawn
    assert "scoring: done, 2 batches in" in after           # the bar goes (leave=False), this line stays


def test_without_a_terminal_no_bar_and_the_held_lines_wait(monkeypatch, capsys):
    monkeypatch.setattr(logs, "_stderr_is_tty", lambda: False)
    logs.setup_logging("INFO")
    logging.getLogger("memcirc.test").info("held")
    with logs.Meter("scoring", total=2, unit="batches") as meter:
        meter.update(2)
    assert capsys.readouterr().err == ""   # bad input found now still prints one line only
