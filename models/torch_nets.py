"""The PyTorch half of the zoo: small versions of standard edge architectures, trained on
the digits and exported the way PyTorch users export (NCHW, TorchScript exporter, opset 17).

Each architecture exists to put a family of ONNX patterns into the zoo; the docstrings say
which. Training is seeded, single-threaded and deterministic.
"""

from __future__ import annotations

import io
import math

import numpy as np
import onnx
import torch
from torch import nn

import digits as data


def _conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: type[nn.Module] | None = nn.ReLU6):
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, act()) if act else nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.use_residual = stride == 1 and cin == cout
        self.block = nn.Sequential(
            *([_conv_bn(cin, hidden, 1)] if expand != 1 else []),
            _conv_bn(hidden, hidden, 3, stride, groups=hidden),
            _conv_bn(hidden, cout, 1, act=None),
        )

    def forward(self, x):
        y = self.block(x)
        return x + y if self.use_residual else y


class MobileNetV2(nn.Module):
    """Depthwise separable inverted residuals, ReLU6, residual Add, BatchNorm, GAP → Gemm."""

    def __init__(self):
        super().__init__()
        spec = [(16, 16, 1, 1), (16, 24, 2, 4), (24, 24, 1, 4), (24, 32, 2, 4), (32, 32, 1, 4), (32, 48, 1, 4)]
        self.features = nn.Sequential(_conv_bn(1, 16), *[InvertedResidual(*s) for s in spec], _conv_bn(48, 96, 1))
        self.classifier = nn.Linear(96, 10)

    def forward(self, x):
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = _conv_bn(cin, cout, 3, stride, act=nn.ReLU)
        self.conv2 = _conv_bn(cout, cout, 3, act=None)
        self.shortcut = _conv_bn(cin, cout, 1, stride, act=None) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x):
        return torch.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


class ResNet(nn.Module):
    """Residual Add, strided 1x1 conv shortcut, MaxPool, BatchNorm; ~55 M MACs (the heavy one)."""

    def __init__(self):
        super().__init__()
        self.stem = _conv_bn(1, 32, act=nn.ReLU)
        self.stage1 = nn.Sequential(BasicBlock(32, 32, 1), BasicBlock(32, 32, 1))
        self.pool = nn.MaxPool2d(2)
        self.stage2 = nn.Sequential(BasicBlock(32, 64, 2), BasicBlock(64, 64, 1))
        self.stage3 = nn.Sequential(BasicBlock(64, 128, 2), BasicBlock(128, 128, 1))
        self.fc = nn.Linear(128, 10)

    def forward(self, x):
        x = self.stage3(self.stage2(self.pool(self.stage1(self.stem(x)))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.reduce = nn.Conv2d(channels, max(channels // 4, 8), 1)
        self.expand = nn.Conv2d(max(channels // 4, 8), channels, 1)

    def forward(self, x):
        gate = nn.functional.hardsigmoid(self.expand(torch.relu(self.reduce(nn.functional.adaptive_avg_pool2d(x, 1)))))
        return x * gate


class MBConv(nn.Module):
    def __init__(self, cin: int, hidden: int, cout: int, stride: int, act: type[nn.Module], se: bool):
        super().__init__()
        self.use_residual = stride == 1 and cin == cout
        self.block = nn.Sequential(
            _conv_bn(cin, hidden, 1, act=act),
            _conv_bn(hidden, hidden, 3, stride, groups=hidden, act=act),
            SqueezeExcite(hidden) if se else nn.Identity(),
            _conv_bn(hidden, cout, 1, act=None),
        )

    def forward(self, x):
        y = self.block(x)
        return x + y if self.use_residual else y


class MobileNetV3(nn.Module):
    """Squeeze-excite (GlobalAveragePool → 1x1 → ReLU → 1x1 → HardSigmoid → Mul), HardSwish,
    Swish (x * sigmoid(x)), depthwise convs, a two-layer Gemm head."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn(1, 16, 3, 2, act=nn.Hardswish),
            MBConv(16, 16, 16, 1, nn.ReLU, True),
            MBConv(16, 48, 24, 2, nn.ReLU, False),
            MBConv(24, 72, 24, 1, nn.Hardswish, True),
            MBConv(24, 96, 40, 2, nn.SiLU, True),
            _conv_bn(40, 96, 1, act=nn.Hardswish),
        )
        self.head = nn.Sequential(nn.Linear(96, 64), nn.Hardswish(), nn.Linear(64, 10))

    def forward(self, x):
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))


class UNet(nn.Module):
    """Encoder-decoder with Concat skips, one ConvTranspose and one bilinear Resize upsampling."""

    def __init__(self):
        super().__init__()
        relu_conv = lambda cin, cout: nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU())  # noqa: E731
        self.enc1 = nn.Sequential(relu_conv(1, 16), relu_conv(16, 16))
        self.enc2 = nn.Sequential(relu_conv(16, 32), relu_conv(32, 32))
        self.bottleneck = relu_conv(32, 64)
        self.up1 = nn.ConvTranspose2d(64, 32, 2, stride=2)
        self.dec1 = relu_conv(64, 32)
        self.up2 = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.reduce = relu_conv(32, 16)
        self.dec2 = relu_conv(32, 16)
        self.out = nn.Conv2d(16, 1, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(nn.functional.max_pool2d(e1, 2))
        b = self.bottleneck(nn.functional.max_pool2d(e2, 2))
        d1 = self.dec1(torch.cat([self.up1(b), e2], 1))
        d2 = self.dec2(torch.cat([self.reduce(self.up2(d1)), e1], 1))
        return self.out(d2)


class VGG(nn.Module):
    """Plain conv-BN-ReLU-MaxPool stacks; Flatten of a 64x4x4 map → Gemm → ReLU → Gemm."""

    def __init__(self):
        super().__init__()
        block = lambda cin, cout: _conv_bn(cin, cout, act=nn.ReLU)  # noqa: E731
        self.features = nn.Sequential(
            block(1, 16), block(16, 16), nn.MaxPool2d(2),
            block(16, 32), block(32, 32), nn.MaxPool2d(2),
            block(32, 64), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(64 * 4 * 4, 64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 10))

    def forward(self, x):
        return self.classifier(self.features(x))


class MLP(nn.Module):
    """Gemm + ReLU layers on the 64 raw pixel features."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x):
        return self.net(x)


class EncoderLayer(nn.Module):
    """Pre-norm transformer layer written out: MatMul attention, Softmax, LayerNorm, exact GELU."""

    def __init__(self, dim: int = 32, heads: int = 4, hidden: int = 64):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(d, dim=-1)
        split = lambda z: z.reshape(b, t, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        attention = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // self.heads), dim=-1)
        x = x + self.proj((attention @ v).transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    def __init__(self, dim: int = 32):
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.position = nn.Parameter(torch.zeros(1, 8, dim))
        self.layers = nn.Sequential(EncoderLayer(dim), EncoderLayer(dim))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        x = self.norm(self.layers(self.embed(x) + self.position))
        return self.head(x.mean(dim=1))


# name → (module class, input layout, task, epochs, keep BatchNorm nodes in the export)
ARCHITECTURES = {
    "mobilenetv2": (MobileNetV2, "nchw", "classification", 15, True),
    "resnet": (ResNet, "nchw", "classification", 12, True),
    "mobilenetv3": (MobileNetV3, "nchw", "classification", 40, False),
    "unet": (UNet, "nchw", "denoising", 12, False),
    "vgg": (VGG, "nchw", "classification", 20, True),
    "mlp": (MLP, "flat", "classification", 60, False),
    "transformer": (Transformer, "tokens", "classification", 80, False),
}

NOISE = 0.5  # std of the Gaussian noise the denoiser removes, in normalized units


def _deterministic(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    return torch.Generator().manual_seed(seed)


def _shift(batch: torch.Tensor, generator: torch.Generator, pixels: int = 2) -> torch.Tensor:
    """Random translations of up to ±pixels for image batches (augmentation)."""
    if batch.ndim != 4:
        return batch
    padded = nn.functional.pad(batch, [pixels] * 4, value=float(batch.min()))
    dx, dy = torch.randint(0, 2 * pixels + 1, (2,), generator=generator).tolist()
    return padded[:, :, dy:dy + batch.shape[2], dx:dx + batch.shape[3]]


def train(name: str, digits: data.Digits, seed: int = 0) -> nn.Module:
    cls, layout, task, epochs, _ = ARCHITECTURES[name]
    generator = _deterministic(seed)
    model = cls()
    x = torch.from_numpy(data.LAYOUTS[layout][0](digits.train))
    y = torch.from_numpy(digits.train.labels)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=epochs * math.ceil(len(x) / 64))
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), 64):
            index = order[start:start + 64]
            batch = _shift(x[index], generator)
            optimizer.zero_grad()
            loss = _loss(model, task, batch, y[index], generator)
            loss.backward()
            optimizer.step()
            scheduler.step()
    return model.eval()


def _loss(model, task, batch, labels, generator):
    if task == "denoising":
        noisy = batch + NOISE * torch.randn(batch.shape, generator=generator)
        return nn.functional.mse_loss(model(noisy), batch)
    return nn.functional.cross_entropy(model(batch), labels)


def export(name: str, model: nn.Module) -> bytes:
    cls, layout, task, _, keep_batchnorm = ARCHITECTURES[name]
    input_name = data.LAYOUTS[layout][1]
    example = torch.zeros((1,) + {"nchw": (1, 32, 32), "flat": (64,), "tokens": (8, 8)}[layout])
    buffer = io.BytesIO()
    torch.onnx.export(
        model, example, buffer, opset_version=17, dynamo=False,
        input_names=[input_name], output_names=["reconstruction" if task == "denoising" else "logits"],
        training=torch.onnx.TrainingMode.EVAL,
        do_constant_folding=not keep_batchnorm,  # folding would fuse BatchNorm into the convs
    )
    proto = onnx.load_from_string(buffer.getvalue())
    proto.producer_version = torch.__version__.split("+")[0]
    return proto.SerializeToString()


def noisy_eval_inputs(images: np.ndarray, seed: int = 1) -> np.ndarray:
    """The denoiser's evaluation inputs: eval images plus seeded noise."""
    rng = np.random.default_rng(seed)
    return (images + NOISE * rng.standard_normal(images.shape)).astype(np.float32)
