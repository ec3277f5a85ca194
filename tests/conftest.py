import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

# Same environment the CLI gets: Keras 2 for TensorFlow, and no network use anywhere.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).parent))

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def repo() -> Path:
    return REPO


# --- A real Ray cluster of two processes on 127.0.0.1 (a head and one worker node, one CPU
# each), started with `ray start` as the README shows; shared by the tests that need one.
RAY = str(Path(sys.executable).with_name("ray"))
NODE = ["--num-cpus", "1", "--object-store-memory", str(100 * 2**20), "--disable-usage-stats", "--block"]


def _start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([RAY, "start", *args, *NODE], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _stop(node: subprocess.Popen) -> None:
    """``ray start --block`` stops what it started on SIGTERM; whatever lingers is killed."""
    with contextlib.suppress(ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(node.pid, signal.SIGTERM)
        node.wait(90)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(node.pid, signal.SIGKILL)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """The address of a running two-node cluster (a head and one worker, one CPU each).

    Token authentication off for the cluster and its clients alike: Ray 2.60 turns it on in
    `ray start` when ~/.ray/auth_token exists (any local ray.init() writes one), while
    `ray status` does not send the token, so the test would depend on the home folder."""
    os.environ["RAY_AUTH_MODE"] = "disabled"
    if shutil.which(RAY) is None:
        pytest.skip("the ray command is not installed")
    address = f"127.0.0.1:{_free_port()}"
    temp = tmp_path_factory.mktemp("ray")
    head = _start("--head", "--node-ip-address", "127.0.0.1", "--port", address.split(":")[1],
                  "--include-dashboard=false", "--temp-dir", str(temp))
    worker = None
    try:
        wait_for(lambda: subprocess.run([RAY, "status", "--address", address], capture_output=True).returncode == 0)
        worker = _start("--address", address, "--node-ip-address", "127.0.0.1")
        wait_for(lambda: _cpus(address) >= 2)  # the worker node has joined
        yield address
    finally:
        for node in (worker, head):
            if node is not None:
                _stop(node)


def _cpus(address: str) -> float:
    """The cluster's CPUs as `ray status` reports them ("0.0/2.0 CPU"), 0 while it cannot tell."""
    status = subprocess.run([RAY, "status", "--address", address], capture_output=True, text=True).stdout
    found = re.search(r"/([0-9.]+) CPU", status)
    return float(found.group(1)) if found else 0.0


def wait_for(ready, timeout: float = 180) -> None:
    end = time.monotonic() + timeout
    while not ready():
        assert time.monotonic() < end, "the Ray cluster did not come up"
        time.sleep(1)


