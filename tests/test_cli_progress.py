"""dist-moe in a log file (stderr not a terminal) slows tqdm's redraws to one per 30 s, for itself and the
workers it starts (the variable is inherited); at a terminal it leaves tqdm's default alone."""

import os

import pytest

from dist_moe import cli


class Terminal:
    def isatty(self) -> bool:
        return True

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


def test_progress_redraws_every_30_s_in_a_log_file_and_at_tqdm_default_on_a_terminal(monkeypatch):
    monkeypatch.setenv("TQDM_MININTERVAL", "0.1")
    monkeypatch.delenv("TQDM_MININTERVAL")  # recorded, so the test's own setting is undone afterwards
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])  # pytest's captured stderr is not a terminal
    assert os.environ["TQDM_MININTERVAL"] == "30"

    monkeypatch.delenv("TQDM_MININTERVAL")
    monkeypatch.setattr("sys.stderr", Terminal())
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    assert "TQDM_MININTERVAL" not in os.environ
