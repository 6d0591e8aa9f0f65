"""Progress output: plain lines when not a terminal, silent under --quiet (in every thread)."""
import io
import os
import threading

from entk_ray.progress import LineProgress, plain_ray_logs, progress_bar, progress_enabled


def test_line_progress_prints_each_tenth_once():
    stream = io.StringIO()  # not a terminal
    with progress_bar(total=1000, desc="features train", unit="ex", stream=stream) as bar:
        assert isinstance(bar, LineProgress)
        for _ in range(100):
            bar.update(10)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 10 and lines[-1].startswith("features train: 1000/1000 ex (100%)")
    assert "\r" not in stream.getvalue() and "\x1b" not in stream.getvalue()
    small = io.StringIO()
    for _ in progress_bar(range(3), desc="rounds", unit="round", stream=small, rate=False):
        pass
    assert small.getvalue().splitlines()[-1].startswith("rounds: 3/3 round (100%), ")
    assert "round/s" not in small.getvalue()


def test_quiet_silences_bars_in_other_threads_too():
    outputs = []

    def worker():  # the Tune searcher runs the telescopic search on its own thread
        stream = io.StringIO()
        with progress_bar(total=2, desc="β search", stream=stream) as bar:
            bar.update(2)
        outputs.append(stream.getvalue())

    with progress_enabled(False):
        thread = threading.Thread(target=worker)
        thread.start()
        thread.join()
    assert outputs == [""]
    stream = io.StringIO()
    with progress_bar(total=2, desc="after", stream=stream) as bar:  # switched back on after the block
        bar.update(2)
    assert stream.getvalue().startswith("after: 2/2")


def test_ray_worker_lines_are_not_coloured_in_a_log_file(monkeypatch):
    monkeypatch.setenv("RAY_COLOR_PREFIX", "unset below")  # so that monkeypatch restores the original
    monkeypatch.delenv("RAY_COLOR_PREFIX")
    plain_ray_logs(io.StringIO())
    assert os.environ["RAY_COLOR_PREFIX"] == "0"
    monkeypatch.setenv("RAY_COLOR_PREFIX", "1")  # an explicit choice wins
    plain_ray_logs(io.StringIO())
    assert os.environ["RAY_COLOR_PREFIX"] == "1"


def test_ray_driver_log_records_lose_their_colour_codes_in_a_log_file():
    import logging

    plain_ray_logs(io.StringIO())
    logger = logging.getLogger("ray._private.worker")
    record = logger.makeRecord(logger.name, logging.INFO, __file__, 1,
                               "Started. View the dashboard at %s%s%s %s%s",
                               ("\x1b[1m", "\x1b[32m", "http://127.0.0.1:8265", "\x1b[39m", "\x1b[22m"), None)
    assert logger.filter(record)
    assert record.getMessage() == "Started. View the dashboard at http://127.0.0.1:8265 "


def test_relayed_ray_lines_lose_their_colour_codes_in_a_log_file(tmp_path):
    """Ray's "[repeated Nx across cluster]" suffix is coloured whatever RAY_COLOR_PREFIX says."""
    import subprocess
    import sys

    script = ("import sys\nfrom entk_ray.progress import plain_ray_logs\nplain_ray_logs()\n"
              "print('(worker) line\\x1b[32m [repeated 2x across cluster]\\x1b[0m', file=sys.stderr)\n"
              "print('\\x1b[1mbold\\x1b[22m out')\n")
    log = tmp_path / "run.log"
    with open(log, "w") as f:
        subprocess.run([sys.executable, "-c", script], stdout=f, stderr=f, check=True)
    text = log.read_text()
    assert "\x1b" not in text
    assert "(worker) line [repeated 2x across cluster]" in text and "bold out" in text
