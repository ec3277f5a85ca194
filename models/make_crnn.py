"""Make the recurrent test models: small CRNNs (conv stack → column sequence → LSTM →
per-step logits), the shape of OCR and keyword-spotting nets on edge devices.

    python models/make_crnn.py           # writes models/crnn_lstm.onnx and models/crnn_bilstm.onnx
    python models/make_crnn.py --check   # regenerates into a temp dir and compares sha256

Each reads a digit image column by column (8 steps) and emits logits for 11 classes per
step (10 digits and a CTC-style blank). Trained briefly on the digits (mean of the per-step
logits against the label) so weights and activations look like a trained net's; exported
with PyTorch's TorchScript exporter (opset 17), which writes ``nn.LSTM`` as an ONNX
``LSTM`` node with explicit zero initial states. Seeded, single-threaded, deterministic.
Outside ``make_zoo.py`` so the zoo's every-model test matrix stays as it is.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import sys
import tempfile
from pathlib import Path

import onnx
import torch
from torch import nn

import digits as data
from torch_nets import _deterministic

MODELS_DIR = Path(__file__).resolve().parent
EPOCHS = 4
CLASSES = 11


class CRNN(nn.Module):
    """Conv → [steps, batch, features] → LSTM (one or both directions) → Linear per step."""

    def __init__(self, bidirectional: bool, hidden: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),  # 16 x 16
            nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),  # 8 x 8
            nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d((2, 1)),  # 4 rows x 8 columns
        )
        self.rnn = nn.LSTM(16 * 4, hidden, bidirectional=bidirectional)
        self.head = nn.Linear(hidden * (2 if bidirectional else 1), CLASSES)

    def forward(self, x):
        f = self.features(x)  # [batch, channels, rows, columns]
        sequence = f.flatten(1, 2).permute(2, 0, 1)  # [columns, batch, channels * rows]
        y, _ = self.rnn(sequence)
        return self.head(y)  # [steps, batch, classes]


def train(model: nn.Module, digits: data.Digits) -> nn.Module:
    generator = _deterministic(0)
    x, y = torch.from_numpy(data.nchw(digits.train)), torch.from_numpy(digits.train.labels)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(EPOCHS):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), 64):
            index = order[start:start + 64]
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[index]).mean(0), y[index]).backward()
            optimizer.step()
    return model.eval()


def export(model: nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.onnx.export(model, torch.zeros(1, 1, 32, 32), buffer, opset_version=17, dynamo=False,
                      input_names=["image"], output_names=["logits"], training=torch.onnx.TrainingMode.EVAL)
    proto = onnx.load_from_string(buffer.getvalue())
    proto.producer_version = torch.__version__.split("+")[0]
    return proto.SerializeToString()


def make(out: Path) -> dict[str, str]:
    digits = data.load()
    written = {}
    for name, bidirectional in [("crnn_lstm", False), ("crnn_bilstm", True)]:
        _deterministic(0)
        content = export(train(CRNN(bidirectional), digits))
        (out / f"{name}.onnx").write_bytes(content)
        written[f"{name}.onnx"] = hashlib.sha256(content).hexdigest()
        print(f"{name}.onnx: {len(content)} bytes", flush=True)
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="regenerate into a temp dir and compare with models/")
    args = parser.parse_args()
    if not args.check:
        make(MODELS_DIR)
        return 0
    with tempfile.TemporaryDirectory(prefix="edgec-crnn-") as tmp:
        fresh = make(Path(tmp))
    differ = [f for f, digest in fresh.items() if hashlib.sha256((MODELS_DIR / f).read_bytes()).hexdigest() != digest]
    print(f"checked {len(fresh)} files: {len(differ)} differ {differ}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
