import logging
import os

from deto.run import console


def test_without_a_bar_progress_is_a_log_line_at_most_every_interval(caplog):
    now = [0.0]
    lines = console._LogLines(total=100, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="deto.run"):
        for step in range(1, 101):
            now[0] = step * 1.0  # one second a step
            lines.update(step, loss="2.000")
    shown = [r.getMessage() for r in caplog.records]
    assert shown[0] == "step 1/100: loss 2.000"  # the first step is shown at once
    assert shown[1] == "step 11/100: loss 2.000"  # then one line every 10 s
    assert shown[-1] == "step 100/100: loss 2.000"  # the last step is always shown
    assert len(shown) == 11


def test_the_first_progress_line_follows_the_first_step(caplog):
    """However long the start took (a resumed run, a slow first step), the first step done is
    logged at once, and the next line only after the interval."""
    now = [0.0]
    lines = console._LogLines(total=300, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="deto.run"):
        now[0] = 40.0  # model building, compilation, data: no line yet
        lines.update(51, loss="3.100")  # resumed at step 50
        for step in range(52, 60):
            now[0] += 0.3
            lines.update(step, loss="3.000")
    assert [r.getMessage() for r in caplog.records] == ["step 51/300: loss 3.100"]
    assert caplog.records[0].name == "deto.run"


def test_a_terminal_without_width_gets_log_lines(monkeypatch):
    monkeypatch.setattr(console.sys.stderr, "isatty", lambda: True, raising=False)
    no_width = os.terminal_size((0, 0))
    monkeypatch.setattr(console.shutil, "get_terminal_size", lambda fallback: no_width)
    assert isinstance(console.progress(10, 0), console._LogLines)
