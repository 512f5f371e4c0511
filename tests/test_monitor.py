"""rednet.monitor's logging: the run's log file gets the `rednet` loggers' lines and Python warnings."""

from __future__ import annotations

import logging
import warnings

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
