"""Fixtures shared by several test modules (torch only: the GPU machine runs some modules without hydra)."""

from __future__ import annotations

import functools
import http.server
import threading

import pytest
import torch

# Modules that run whole trainings (minutes on a CPU): marked slow, so `make test-fast` (-m "not slow") skips them.
SLOW_MODULES = ("test_train.py", "test_distributed.py", "test_fault_tolerance.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for a module: at tiny shapes threads only add synchronization (and stall on a busy
    2-core machine), and results that must match a 1-thread subprocess need the same summation order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def server(tmp_path):
    """A loopback HTTP server over tmp_path/www; yields (directory, base URL, stop function)."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    stopped = []

    def stop() -> None:
        if not stopped:
            httpd.shutdown()
            httpd.server_close()
            stopped.append(True)

    yield root, f"http://127.0.0.1:{httpd.server_address[1]}", stop
    stop()


@pytest.fixture
def weights_cache(tmp_path, monkeypatch):
    """A fresh $TORCH_HOME and a private copy of rednet's weights registry; yields the download cache folder."""
    from rednet import weights  # (imported here: the GPU machine runs torch-only modules without rednet's extras)

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # torch.hub.set_dir() would override TORCH_HOME
    monkeypatch.setattr(weights, "PRETRAINED", dict(weights.PRETRAINED))
    return tmp_path / "torch_home" / "hub" / "checkpoints"
