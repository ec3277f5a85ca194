"""The emulated arm64 devices (qemu, `make arm-emulator`): int8 and fp32 .tflite and an .ort
model run there, wall time is marked emulated, and the instruction-count cost is repeatable
and tells a core with dot-product instructions from one without.

Emulation is hundreds of times slower than native: one tiny zoo model, few runs.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from edgec.build import BuildOptions, build
from edgec.profile.devices import get_device
from edgec.profile.emulator import SETUP_HINT, setup_problem
from edgec.profile.on_device import profile_on_device
from edgec.profile.schema import ProfileSettings

REPO = Path(__file__).resolve().parent.parent
MLP = REPO / "models" / "mlp.onnx"
CALIB = REPO / "models" / "data" / "digits_calib_flat.npz"
QUICK = ProfileSettings(warmup=1, runs=3)

_problem = setup_problem(get_device("emulated-a76").emulation)
pytestmark = pytest.mark.skipif(_problem is not None, reason=f"emulated arm64 device: {_problem}. {SETUP_HINT}")


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("mlp")
    int8 = BuildOptions(precision="int8", calib=str(CALIB), min_cosine=0.0, bias_correction=False)
    built = {"fp32": build(MLP, "tflite-arm", out / "fp32", BuildOptions()),
             "int8": build(MLP, "tflite-arm", out / "int8", int8),
             "ort": build(MLP, "ort-arm", out / "ort", BuildOptions())}
    suffix = {"fp32": ".tflite", "int8": ".tflite", "ort": ".ort"}
    return {kind: next(p for p in result.artifacts if p.suffix == suffix[kind]) for kind, result in built.items()}


@pytest.fixture(scope="module")
def measure(artifacts):
    """Measurements by (device, artifact kind), each taken once per module."""
    taken: dict[tuple[str, str], dict] = {}

    def get(device: str, kind: str) -> dict:
        if (device, kind) not in taken:
            taken[device, kind] = profile_on_device(get_device(device), artifacts[kind], QUICK)
        return taken[device, kind]

    return get


@pytest.mark.parametrize("kind", ["fp32", "int8", "ort"])
def test_emulated_device_runs_the_artifact(measure, kind):
    measurement = measure("emulated-a76", kind)
    assert measurement["device"] == {"name": "emulated-a76", "kind": "emulated", "arch": "aarch64",
                                     "cpu": "cortex-a76", "emulated": True}
    assert measurement["runtime"]["name"] == ("onnxruntime" if kind == "ort" else "litert")
    assert measurement["latency_ms"]["runs"] == QUICK.runs and measurement["latency_ms"]["median"] > 0
    cost = measurement["cost"]
    assert cost["cpu"] == "cortex-a76" and cost["counted_runs"] > 0
    assert cost["instructions"] > cost["vector_instructions"] > 0


def test_cost_repeats_within_one_percent(measure, artifacts):
    first = measure("emulated-a76", "int8")["cost"]
    again = profile_on_device(get_device("emulated-a76"), artifacts["int8"], QUICK)["cost"]
    for key in ("instructions", "vector_instructions"):
        assert abs(again[key] - first[key]) <= 0.01 * first[key], (key, first[key], again[key])


def test_int8_gains_depend_on_dot_product_instructions(measure):
    """A76 has SDOT, so XNNPACK's int8 kernels need far fewer vector instructions than fp32;
    A53 has not, and int8 needs more vector instructions there than on A76."""
    vector = {(device, kind): measure(device, kind)["cost"]["vector_instructions"]
              for device in ("emulated-a53", "emulated-a76") for kind in ("fp32", "int8")}
    assert vector["emulated-a76", "int8"] < 0.5 * vector["emulated-a76", "fp32"], vector
    assert vector["emulated-a53", "int8"] > 2 * vector["emulated-a76", "int8"], vector
    # fp32 kernels use no dot product: the same vector work on both cores.
    assert vector["emulated-a53", "fp32"] == pytest.approx(vector["emulated-a76", "fp32"], rel=0.05), vector


def test_build_profiles_on_an_emulated_device_with_its_own_threads(tmp_path):
    """`build --profile emulated-a76` (make deploy's path): the device's single thread, not
    the target's four."""
    options = BuildOptions(profile_device="emulated-a76")
    result = build(MLP, "tflite-arm", tmp_path / "out", options)
    profile = result.report["profile"]
    assert profile["device"]["emulated"] is True and profile["runtime"]["threads"] == 1
    assert profile["cost"]["instructions"] > 0
    assert (tmp_path / "out" / "report.html").is_file()


def test_int8_speed_check_on_an_emulated_core_judges_by_instructions(tmp_path):
    """An arm target's int8 speed check, run on the emulated Cortex-A76 instead of this x86
    host: the decision compares instructions per inference and ships what it says."""
    options = BuildOptions(precision="int8", calib=str(CALIB), min_cosine=0.0, bias_correction=False,
                           speed_device="emulated-a76")
    result = build(MLP, "tflite-arm", tmp_path / "out", options)
    decision = result.report["speed_check"]
    assert decision["on"] == "device emulated-a76" and decision["metric"] == "instructions"
    int8_wins = decision["int8_instructions"] < decision["fp32_instructions"]
    assert decision["shipped"] == result.report["precision"] == ("int8" if int8_wins else "fp32")
    assert result.report["int8_options"]["speed_device"] == "emulated-a76"
