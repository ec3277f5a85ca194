"""Make models/field/: models that reproduce what real exports do to a compiler, untrained.

    python models/field.py    # needs the `zoo` extra (torch)

`vit.onnx`: a small PyTorch ViT (patch conv, class token, two pre-norm blocks of
nn.MultiheadAttention and an Erf GELU MLP, LayerNormalization at opset 17) exported by the
TorchScript exporter with a symbolic batch, as torchvision and timm ViTs are: the class
token's expand becomes Shape → ConstantOfShape → Where → Expand arithmetic, and attention
reshapes take their sizes from Shape. Seeded weights; deterministic output for the pinned
torch version.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

OUT = Path(__file__).resolve().parent / "field"


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        x = x + self.attention(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(self, dim: int = 32, heads: int = 4, patch: int = 4, image: int = 16, depth: int = 2, classes: int = 10):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, patch)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.position = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, dim) * 0.1)
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.position
        return self.head(self.norm(self.blocks(x)[:, 0]))


def export_vit(path: Path) -> None:
    torch.manual_seed(0)
    model = ViT().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter, as most real exports were made
        torch.onnx.export(model, torch.randn(1, 3, 16, 16), str(path), opset_version=17, dynamo=False,
                          input_names=["image"], output_names=["logits"], dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})


if __name__ == "__main__":
    OUT.mkdir(exist_ok=True)
    export_vit(OUT / "vit.onnx")
