"""Profiling on an SSH board, against a real sshd on 127.0.0.1 that the fixture starts with its
own config, host key and authorized client key (the "board" is this machine)."""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from edgec.build import BuildOptions, build
from edgec.errors import DeviceError
from edgec.profile.devices import Device, SshAccess, get_device
from edgec.profile.on_device import profile_on_device
from edgec.profile.schema import ProfileSettings

SSHD = Path("/usr/sbin/sshd")
REPO = Path(__file__).resolve().parent.parent
MLP = REPO / "models" / "mlp.onnx"
QUICK = ProfileSettings(warmup=1, runs=3)
# Every character a shell or scp could misread: quotes, $(), backticks, ';', ':', a leading '-'.
NASTY_NAME = "-x; touch $(echo PWNED) `id` 'q\" a:b.onnx"

pytestmark = pytest.mark.skipif(not SSHD.is_file() or shutil.which("ssh") is None,
                                reason="needs /usr/sbin/sshd and ssh: apt-get install openssh-server "
                                       "(make test-devices does it)")


@dataclass(frozen=True)
class Board:
    port: int
    client_key: Path
    known_hosts: Path
    remote_tmp: Path  # the board's TMPDIR, where `mktemp -d` makes the profile's folder

    def device(self, **changes) -> Device:
        access = SshAccess(host="127.0.0.1", user=getpass.getuser(), key=self.client_key, port=self.port,
                           known_hosts=self.known_hosts, connect_timeout_s=5)
        device = Device(name="loopback", kind="ssh", arch="x86_64", runtimes=("onnxruntime", "litert"),
                        threads=1, python=sys.executable, timeout_s=60, ssh=access)
        ssh_changes = {k: changes.pop(k) for k in list(changes) if k in SshAccess.__dataclass_fields__}
        return replace(device, ssh=replace(access, **ssh_changes), **changes)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path


def _wait_for_port(port: int, process: subprocess.Popen, log: Path) -> None:
    for _ in range(100):
        if process.poll() is not None:
            pytest.skip(f"sshd did not start: {log.read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return
        except OSError:
            time.sleep(0.05)
    pytest.fail(f"sshd does not listen on port {port}: {log.read_text()}")


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    home = tmp_path_factory.mktemp("sshd")
    client = home / "client files"  # a space, as in many home folders
    client.mkdir()
    host_key, client_key = _keygen(home / "host_key"), _keygen(client / "client_key")
    (home / "authorized_keys").write_text(Path(f"{client_key}.pub").read_text())
    remote_tmp = home / "remote_tmp"
    remote_tmp.mkdir()
    port = _free_port()
    config = home / "sshd_config"
    config.write_text(f"""Port {port}
ListenAddress 127.0.0.1
HostKey {host_key}
PidFile {home}/sshd.pid
AuthorizedKeysFile {home}/authorized_keys
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PermitRootLogin prohibit-password
SetEnv TMPDIR={remote_tmp}
Subsystem sftp internal-sftp
""")
    known_hosts = client / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{port} {Path(f'{host_key}.pub').read_text()}")
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation folder
    log = home / "sshd.log"
    # An absolute -f path: sshd re-executes itself for every connection.
    process = subprocess.Popen([str(SSHD), "-D", "-f", str(config), "-E", str(log)])
    try:
        _wait_for_port(port, process, log)
        yield Board(port, client_key, known_hosts, remote_tmp)
    finally:
        process.terminate()
        process.wait(timeout=10)


def _shape(value):
    """The keys of a JSON value, recursively: what "the same JSON shape" compares."""
    return {key: _shape(item) for key, item in value.items()} if isinstance(value, dict) else "value"


def test_remote_profile_has_the_same_shape_as_local(board, tmp_path):
    artifact = tmp_path / NASTY_NAME
    shutil.copyfile(MLP, artifact)
    remote = profile_on_device(board.device(), artifact, QUICK)
    local = profile_on_device(get_device("local"), artifact, QUICK)
    assert _shape(remote) == _shape(local)
    assert remote["device"]["kind"] == "ssh" and remote["artifact"] == local["artifact"]
    assert remote["artifact"]["file"] == NASTY_NAME
    assert not list(Path.cwd().glob("PWNED*")) and not list(tmp_path.glob("PWNED*"))
    assert list(board.remote_tmp.iterdir()) == []


def _assert_fails(device: Device, reason: str, *fragments: str, artifact: Path = MLP,
                  settings: ProfileSettings = QUICK) -> None:
    with pytest.raises(DeviceError) as caught:
        profile_on_device(device, artifact, settings)
    message = str(caught.value)
    assert caught.value.reason == reason, message
    for fragment in fragments:
        assert fragment in message, message


def test_unreachable_board(board):
    _assert_fails(board.device(port=_free_port()), "unreachable", "Connection refused", "sshd runs on it")


def test_wrong_key(board, tmp_path):
    _assert_fails(board.device(key=_keygen(tmp_path / "stranger")), "auth", "Permission denied", "authorized_keys")


def test_unknown_host_key_is_refused(board, tmp_path):
    other = _keygen(tmp_path / "impostor")
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{board.port} {Path(f'{other}.pub').read_text()}")
    _assert_fails(board.device(known_hosts=known_hosts), "host_key", "ssh-keyscan")


def test_board_without_numpy_or_runtime(board, tmp_path):
    site = tmp_path / "site"  # numpy but no onnxruntime, for the board's own python3
    site.mkdir()
    import numpy

    numpy_dir = Path(numpy.__file__).parent
    for name in ("numpy", "numpy.libs"):
        if (numpy_dir.parent / name).exists():
            (site / name).symlink_to(numpy_dir.parent / name)
    python = tmp_path / "python-numpy-only"
    python.write_text(f'#!/bin/sh\nPYTHONPATH={site} exec {sys.executable} -S "$@"\n')
    python.chmod(0o755)
    _assert_fails(board.device(python=str(python)), "runtime_missing",
                  "device lacks onnxruntime: pip install onnxruntime==1.23.0")
    _assert_fails(board.device(python="/nowhere/python3"), "runtime_missing", "has no Python at '/nowhere/python3'")
    assert list(board.remote_tmp.iterdir()) == []


def _processes_inside(folder: Path) -> list[str]:
    """Processes whose working directory is (or was, before removal) under ``folder``."""
    found = []
    for cwd in Path("/proc").glob("[0-9]*/cwd"):
        try:
            if os.readlink(cwd).startswith(str(folder)):
                found.append(cwd.parent.name)
        except OSError:  # gone meanwhile, or not ours to read
            pass
    return found


def test_timeout_stops_the_profile_and_cleans_up(board):
    start = time.monotonic()
    _assert_fails(board.device(timeout_s=4), "timeout", "timeout_s (4 s)",
                  settings=ProfileSettings(warmup=1, runs=10**8))
    assert time.monotonic() - start < 4 + 30
    assert list(board.remote_tmp.iterdir()) == []
    assert _processes_inside(board.remote_tmp) == []  # the runner on the board stopped too


def test_a_runner_slower_to_start_than_the_time_left_is_killed(board, tmp_path):
    """The runner arms its own timer only once started (1 s at least): one that starts after
    the profile has timed out would outlive it, unless the clean-up stops it."""
    python = tmp_path / "slow-python"  # one process throughout: sleeps, then becomes the board's Python
    python.write_text(f"#!{sys.executable}\nimport os, sys, time\ntime.sleep(8)\n"
                      f"os.execv({sys.executable!r}, [{sys.executable!r}, *sys.argv[1:]])\n")
    python.chmod(0o755)
    _assert_fails(board.device(timeout_s=3, python=str(python)), "timeout", "timeout_s (3 s)")
    assert list(board.remote_tmp.iterdir()) == []
    assert _processes_inside(board.remote_tmp) == []



def test_int8_speed_check_on_a_board_judges_by_latency(board, tmp_path):
    """--speed-check-on an SSH board: both artifacts are timed there in alternating rounds
    and the faster is shipped."""
    options = BuildOptions(precision="int8", calib=str(REPO / "models" / "data" / "digits_calib_flat.npz"),
                           min_cosine=0.0, speed_device=board.device())
    result = build(MLP, "tflite-x86", tmp_path / "out", options)
    decision = result.report["speed_check"]
    assert decision["on"] == "device loopback" and decision["metric"] == "ms"
    assert decision["shipped"] == result.report["precision"] == ("int8" if decision["int8_ms"] < decision["fp32_ms"] else "fp32")
    assert list(board.remote_tmp.iterdir()) == []
