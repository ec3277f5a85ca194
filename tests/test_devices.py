"""Device inventory (targets/devices.toml), the self-contained device runner, and profiling
on the local device through it."""

from __future__ import annotations

import json
import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest

from edgec.errors import DeviceError, ModelLoadError
from edgec.profile import device_runner
from edgec.profile.devices import DEVICES_FILE, get_device, load_devices
from edgec.profile.on_device import profile_on_device
from edgec.profile.schema import SCHEMA, ProfileSettings

REPO = Path(__file__).resolve().parent.parent
MLP = REPO / "models" / "mlp.onnx"
QUICK = ProfileSettings(warmup=1, runs=3)


def test_builtin_inventory_has_local_and_two_emulated_arm_classes():
    devices = load_devices()
    assert devices["local"].kind == "local"
    cpus = {d.emulation.cpu for d in devices.values() if d.kind == "emulated"}
    assert {"cortex-a53", "cortex-a76"} <= cpus
    assert all(d.arch == "aarch64" and d.threads == 1 for d in devices.values() if d.kind == "emulated")


def test_commented_ssh_example_parses_when_uncommented(tmp_path):
    commented = DEVICES_FILE.read_text().split("# [pi5]", 1)[1]
    example = "[pi5]" + "\n".join(line.removeprefix("# ") for line in commented.splitlines())
    (tmp_path / "mine.toml").write_text(example)
    pi5 = load_devices(tmp_path / "mine.toml")["pi5"]
    assert (pi5.kind, pi5.ssh.host, pi5.ssh.port, pi5.threads) == ("ssh", "raspberrypi.local", 22, 4)
    assert pi5.ssh.key == Path("~/.ssh/id_ed25519").expanduser()


def test_user_file_adds_devices_and_replaces_same_name_whole(tmp_path):
    (tmp_path / "mine.toml").write_text(
        '[local]\nkind = "local"\nruntimes = ["onnxruntime"]\nthreads = 2\n'
        '[board]\nkind = "ssh"\narch = "aarch64"\nhost = "10.0.0.7"\nuser = "pi"\nkey = "keys/pi"\n'
        'runtimes = ["litert"]\nthreads = 4\n')
    devices = load_devices(tmp_path / "mine.toml")
    assert devices["local"].runtimes == ("onnxruntime",) and devices["local"].threads == 2
    assert devices["board"].ssh.key == tmp_path / "keys" / "pi"  # relative to the user's file
    assert "emulated-a76" in devices


SSH_BUT_HOST = 'kind = "ssh"\narch = "aarch64"\nuser = "pi"\nkey = "k"\nruntimes = ["litert"]\nthreads = 1\n'


@pytest.mark.parametrize("entry, fragments", [
    ('kind = "telnet"', ["kind is 'telnet'", "'local', 'ssh', 'emulated'"]),
    ('kind = "local"\nruntimes = ["onnxruntime"]\nthreads = 1\ncolour = "red"', ["unknown keys ['colour']"]),
    (SSH_BUT_HOST, ["missing keys ['host']"]),
    ('kind = "local"\nruntimes = ["tensorrt"]\nthreads = 1', ["runtimes is ['tensorrt']", "'onnxruntime', 'litert'"]),
    ('kind = "local"\nruntimes = ["litert"]\nthreads = 0', ["threads is 0", "at least 1"]),
    ('kind = "emulated"\narch = "aarch64"\ncpu = "cortex-a76"\nroot = "."\nruntimes = ["litert"]\nthreads = 4',
     ["threads is 4", "single-threaded"]),
    (SSH_BUT_HOST + 'host = "-oProxyCommand=x"', ["host is '-oProxyCommand=x'"]),
    (SSH_BUT_HOST + 'host = "b"\nport = 70000', ["port is 70000"]),
])
def test_malformed_entries_say_what_to_fix(tmp_path, entry, fragments):
    path = tmp_path / "bad.toml"
    path.write_text(f"[dev]\n{entry}\n")
    with pytest.raises(DeviceError) as caught:
        load_devices(path)
    message = str(caught.value)
    assert caught.value.reason == "config" and "Device 'dev'" in message and str(path) in message
    for fragment in fragments:
        assert fragment in message, message


def test_unknown_device_lists_known_ones():
    with pytest.raises(DeviceError, match=r"Unknown device 'pi9'.*emulated-a53.*local"):
        get_device("pi9")


def test_runner_pins_are_the_projects_pins():
    pins = {line.strip().lower() for line in (REPO / "constraints.txt").read_text().splitlines()}
    assert {req.lower() for _, req in device_runner.REQUIREMENTS.values()} <= pins


def test_runner_imports_nothing_of_edgec():
    source = Path(device_runner.__file__).read_text()
    assert not re.search(r"^\s*(from|import)\s+edgec", source, re.MULTILINE)


def _run_runner(python: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([python, device_runner.__file__, *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120, check=False)


def test_runner_prints_only_its_json_on_stdout(tmp_path):
    completed = _run_runner(sys.executable, str(MLP), "--warmup", "1", "--runs", "4", "--count-marker", cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr
    result = json.loads(completed.stdout)
    assert set(result) == {"runtime", "load_ms", "first_run_ms", "latency_ms", "peak_memory_mb", "memory", "arch", "cpu",
                           "count"}
    latency = result["latency_ms"]
    assert latency["runs"] == 4 and latency["min"] <= latency["median"] <= latency["p99"]
    assert result["runtime"]["name"] == "onnxruntime" and result["peak_memory_mb"] > 0


def test_runner_without_numpy_says_what_to_install(tmp_path):
    # -I -S: a Python without site-packages, like a fresh board.
    completed = subprocess.run([sys.executable, "-I", "-S", device_runner.__file__, str(MLP)],
                               capture_output=True, text=True, check=False)
    assert completed.returncode == device_runner.EXIT_RUNTIME_MISSING
    assert json.loads(completed.stdout)["error"] == "runtime_missing"
    assert "device lacks numpy: pip install numpy==1.26.4" in completed.stderr


def test_local_device_profile_has_the_schema_shape():
    measurement = profile_on_device(get_device("local"), MLP, QUICK)
    assert measurement["schema"] == SCHEMA
    device = measurement["device"]
    assert (device["name"], device["kind"], device["arch"], device["emulated"]) == ("local", "local", platform.machine(),
                                                                                   False)
    assert measurement["artifact"]["file"] == "mlp.onnx" and measurement["artifact"]["size_bytes"] == MLP.stat().st_size
    latency = measurement["latency_ms"]
    assert latency["runs"] == len(latency["samples"]) == 3 and measurement["cost"] is None
    assert measurement["memory"]["peak_rss_mb"] == measurement["peak_memory_mb"] > 0


def test_artifact_for_a_runtime_the_device_lacks_is_refused(tmp_path):
    (tmp_path / "mine.toml").write_text('[x86box]\nkind = "local"\nruntimes = ["litert"]\nthreads = 1\n')
    device = load_devices(tmp_path / "mine.toml")["x86box"]
    with pytest.raises(DeviceError, match="has no onnxruntime runtime"):
        profile_on_device(device, MLP, QUICK)
    with pytest.raises(ModelLoadError, match="does not exist"):
        profile_on_device(device, tmp_path / "gone.tflite", QUICK)


def test_emulated_device_not_set_up_says_how(tmp_path):
    (tmp_path / "mine.toml").write_text('[arm]\nkind = "emulated"\narch = "aarch64"\ncpu = "cortex-a76"\n'
                                        'root = "empty"\nruntimes = ["onnxruntime"]\nthreads = 1\n')
    device = load_devices(tmp_path / "mine.toml")["arm"]
    with pytest.raises(DeviceError, match="make arm-emulator") as caught:
        profile_on_device(device, MLP, QUICK)
    assert caught.value.reason == "not_set_up"
