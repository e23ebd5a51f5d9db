"""runtime/progress.py: a tqdm bar on a terminal, one log line per N % elsewhere, silent when off."""

from __future__ import annotations

import io
import logging

import pytest

from otmf_exp.runtime.progress import LogProgress, progress


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def _log_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "otmf_exp.progress"]


def test_non_tty_lines_every_10_percent_no_cr(caplog: pytest.LogCaptureFixture, capsys) -> None:
    stream = io.StringIO()  # not a terminal
    with caplog.at_level(logging.INFO, logger="otmf_exp.progress"):
        bar = progress(range(50), desc="AdaMerging task 1", stream=stream)
        assert isinstance(bar, LogProgress)
        for i in bar:
            if i % 10 == 0:
                bar.set_postfix(entropy="0.5")
    lines = _log_lines(caplog)
    assert len(lines) == 10
    assert lines[0].startswith("AdaMerging task 1:  10% (5/50)")
    assert lines[-1].startswith("AdaMerging task 1: 100% (50/50)")
    assert lines[-1].endswith("entropy=0.5")
    out = capsys.readouterr()
    assert stream.getvalue() == "" and "\r" not in out.out + out.err + "".join(lines)


def test_non_tty_every_and_manual_total(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="otmf_exp.progress"):
        for _ in progress(range(7), desc="a", every=25, stream=io.StringIO()):
            pass
        with progress(total=3, desc="zoo", stream=io.StringIO()) as bar:
            for t in ("pre", "x", "y"):
                bar.set_description(f"zoo: {t}")
                bar.update(1)
    lines = _log_lines(caplog)
    # 7 steps at 25 %: 28.6 / 57.1 / 85.7 / 100 % (a step may cross one boundary at most here)
    assert [x.split("(")[1].split(")")[0] for x in lines[:4]] == ["2/7", "4/7", "6/7", "7/7"]
    # 3 steps at 10 %: each step crosses >= one boundary, one line per step
    assert [x.split(":")[1] for x in lines[4:]] == [" pre", " x", " y"]
    assert len(lines) == 7


def test_tty_draws_a_bar() -> None:
    stream = _Tty()
    for _ in progress(range(20), desc="fine-tune", stream=stream, leave=True):
        pass
    text = stream.getvalue()
    assert "fine-tune" in text and "20/20" in text and "\r" in text and "|" in text


@pytest.mark.parametrize("tty", [False, True])
def test_disabled_prints_nothing(tty: bool, caplog: pytest.LogCaptureFixture, capsys) -> None:
    stream = _Tty() if tty else io.StringIO()
    with caplog.at_level(logging.INFO, logger="otmf_exp.progress"):
        bar = progress(range(5), desc="x", enabled=False, stream=stream)
        assert list(bar) == [0, 1, 2, 3, 4]
        bar.set_postfix(a=1)
        bar.update(3)
    out = capsys.readouterr()
    assert stream.getvalue() == "" and not _log_lines(caplog) and out.out == "" and out.err == ""


def test_bad_every() -> None:
    with pytest.raises(ValueError, match="every"):
        progress(range(3), every=0, stream=io.StringIO())
