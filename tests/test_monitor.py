"""rednet.monitor's logging: the run's log file gets the `rednet` loggers' lines and Python warnings."""

from __future__ import annotations

import logging
import warnings

import torch

from rednet import monitor


def test_warnings_reach_the_log_file(tmp_path):
    try:
        for run in ("first", "second"):  # a second run in the same process (tests, sweeps) logs to its own file
            log_file = tmp_path / f"{run}.log"
            # catch_warnings puts warnings.showwarning back on exit, as pytest does around each test.
            with warnings.catch_warnings():
                warnings.simplefilter("always")
                monitor.setup_logging(log_file)
                logging.getLogger("rednet").info("%s run", run)
                warnings.warn(f"the classifier is left at its fresh initialization ({run})", UserWarning, stacklevel=1)
            text = log_file.read_text()
            assert f"[INFO] {run} run" in text
            assert f"[WARNING] {__file__}" in text and "UserWarning: the classifier is left at its fresh" in text
            assert f"({run})" in text
            assert "warnings.warn(" not in text  # the message, not the source line Python prints under it
    finally:
        logging.captureWarnings(False)  # other tests expect warnings where pytest collects them
        for name in ("rednet", "__main__", "train", "eval", "py.warnings"):
            for handler in list(logging.getLogger(name).handlers):
                logging.getLogger(name).removeHandler(handler)
                handler.close()


def test_a_weights_download_without_a_terminal_writes_no_bar_frames(server, weights_cache, capsys):
    """pretrained=true in a batch job: torch.hub's download bar would write its frames into the job's log."""
    from rednet import weights

    root, base_url, _ = server
    torch.save({"w": torch.zeros(500_000)}, root / "w.pth")  # ~2 MB: several bar updates on a terminal
    path = weights.download(f"{base_url}/w.pth", file_name="w.pth")
    assert path.stat().st_size == (root / "w.pth").stat().st_size
    assert "\r" not in capsys.readouterr().err  # pytest's captured stderr is no terminal
