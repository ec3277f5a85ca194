"""The field's standard ONNX→TFLite converter, onnx2tf, run as a peer for the benchmark.

Optional (``pip install -e '.[compare]'``) and never part of a build. Each conversion runs in
its own process (onnx2tf keeps global state and prints a lot), on a copy of the model (it
overwrites its input with a simplified one), with the network cut off:
onnx2tf fetches a sample-image file from the internet even for float conversion, so the
worker writes a seeded stand-in of that file into its working directory and makes any
HTTP request fail instead of reaching out.

    python -m edgec.bench.onnx2tf MODEL OUT_DIR [--calib INPUT_NAME=FILE.npy]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

# The file onnx2tf would download (see onnx2tf.utils.common_functions.download_test_image_data).
SAMPLE_FILE = "calibration_image_sample_data_20x128x128x3_float32.npy"
TIMEOUT_S = 900


def available() -> bool:
    return importlib.util.find_spec("onnx2tf") is not None


def convert(model: Path, out_dir: Path, calib: dict[str, Path] | None = None) -> tuple[dict[str, Path], str | None]:
    """Run onnx2tf on ``model``: (produced .tflite files by kind, error or None).

    Kinds: ``fp32``, and with ``calib`` (input name → NHWC .npy) ``int8`` (float I/O).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    private = out_dir / model.name  # onnx2tf simplifies its input file in place: give it a copy
    shutil.copyfile(model, private)
    command = [sys.executable, "-m", "edgec.bench.onnx2tf", str(private.resolve()), str(out_dir.resolve())]
    for name, path in (calib or {}).items():
        command += ["--calib", f"{name}={path.resolve()}"]
    try:
        done = subprocess.run(command, cwd=out_dir, capture_output=True, text=True, timeout=TIMEOUT_S,
                              env={**os.environ, "CUDA_VISIBLE_DEVICES": "-1"})
    except subprocess.TimeoutExpired:
        return {}, f"timed out after {TIMEOUT_S} s"
    files = {kind: out_dir / f"{model.stem}_{suffix}.tflite" for kind, suffix in
             (("fp32", "float32"), ("int8", "integer_quant"))}
    produced = {kind: path for kind, path in files.items() if path.is_file()}
    return produced, None if done.returncode == 0 else _last_error(done.stdout + done.stderr)


def _last_error(log: str) -> str:
    """The last line that names an error (onnx2tf prints its traceback last), else the last line."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    return (errors or lines or ["failed"])[-1][:300]


def _cut_network() -> None:
    import requests

    def refuse(*args, **kwargs):
        raise requests.exceptions.ConnectionError("edgec bench: network access is disabled")

    requests.get = requests.post = refuse
    if not Path(SAMPLE_FILE).exists():
        np.save(SAMPLE_FILE, np.random.default_rng(0).random((20, 128, 128, 3), dtype=np.float32))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("out_dir")
    parser.add_argument("--calib", action="append", default=[], help="INPUT_NAME=FILE.npy (NHWC for 4-D inputs)")
    args = parser.parse_args(argv)
    _cut_network()
    import onnx2tf

    calib = [[name, path, np.zeros(1, np.float32), np.ones(1, np.float32)]
             for name, path in (item.split("=", 1) for item in args.calib)]
    onnx2tf.convert(
        input_onnx_file_path=args.model,
        output_folder_path=args.out_dir,
        non_verbose=True,
        output_integer_quantized_tflite=bool(calib),
        custom_input_op_name_np_data_path=calib or None,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
