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


class ConvBnAct(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1):
        super().__init__(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout), nn.SiLU())


class CSPBlock(nn.Module):
    """Cross-stage partial block: half the channels go through residual 1x1→3x3 bottlenecks,
    the other half around them, then Concat and a 1x1 fuse (YOLOv5/YOLOX's C3)."""

    def __init__(self, cin: int, cout: int, depth: int, residual: bool = True):
        super().__init__()
        hidden = cout // 2
        self.main, self.bypass = ConvBnAct(cin, hidden, 1), ConvBnAct(cin, hidden, 1)
        self.blocks = nn.ModuleList(nn.Sequential(ConvBnAct(hidden, hidden, 1), ConvBnAct(hidden, hidden, 3)) for _ in range(depth))
        self.residual = residual
        self.fuse = ConvBnAct(2 * hidden, cout, 1)

    def forward(self, x):
        y = self.main(x)
        for block in self.blocks:
            y = y + block(y) if self.residual else block(y)
        return self.fuse(torch.cat([y, self.bypass(x)], 1))


class DecoupledHead(nn.Module):
    """YOLOX's head at one stride: a 1x1 stem, then separate 3x3 branches for classes and for
    box + objectness; output channels [box 4, objectness 1, classes], scores through Sigmoid."""

    def __init__(self, cin: int, width: int, classes: int):
        super().__init__()
        self.stem = ConvBnAct(cin, width, 1)
        self.cls_branch = nn.Sequential(ConvBnAct(width, width), ConvBnAct(width, width))
        self.reg_branch = nn.Sequential(ConvBnAct(width, width), ConvBnAct(width, width))
        self.cls, self.box, self.obj = nn.Conv2d(width, classes, 1), nn.Conv2d(width, 4, 1), nn.Conv2d(width, 1, 1)

    def forward(self, x):
        x = self.stem(x)
        features = self.reg_branch(x)
        return torch.cat([self.box(features), torch.sigmoid(self.obj(features)), torch.sigmoid(self.cls(self.cls_branch(x)))], 1)


class Detector(nn.Module):
    """Anchor-free YOLOX-style detector for 416x416 RGB: CSP backbone (BatchNorm + SiLU),
    PAN neck (nearest Upsample → Resize, Concat, strided downsampling), decoupled heads at
    strides 8/16/32. Most compute sits in wide, high-resolution maps (few parameters)."""

    def __init__(self, classes: int = 20, widths: tuple[int, ...] = (32, 96, 128, 112, 128), head_width: int = 48):
        super().__init__()
        w = widths
        self.stem = ConvBnAct(3, w[0], 3, 2)
        self.dark2 = nn.Sequential(ConvBnAct(w[0], w[1], 3, 2), CSPBlock(w[1], w[1], 3))
        self.dark3 = nn.Sequential(ConvBnAct(w[1], w[2], 3, 2), CSPBlock(w[2], w[2], 3))
        self.dark4 = nn.Sequential(ConvBnAct(w[2], w[3], 3, 2), CSPBlock(w[3], w[3], 3))
        self.dark5 = nn.Sequential(ConvBnAct(w[3], w[4], 3, 2), CSPBlock(w[4], w[4], 1, residual=False))
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.lateral5, self.top_down4 = ConvBnAct(w[4], w[3], 1), CSPBlock(2 * w[3], w[3], 1, residual=False)
        self.lateral4, self.top_down3 = ConvBnAct(w[3], w[2], 1), CSPBlock(2 * w[2], w[2], 1, residual=False)
        self.down3, self.bottom_up4 = ConvBnAct(w[2], w[2], 3, 2), CSPBlock(2 * w[2], w[3], 1, residual=False)
        self.down4, self.bottom_up5 = ConvBnAct(w[3], w[3], 3, 2), CSPBlock(2 * w[3], w[4], 1, residual=False)
        self.heads = nn.ModuleList(DecoupledHead(c, head_width, classes) for c in (w[2], w[3], w[4]))

    def forward(self, x):
        c3 = self.dark3(self.dark2(self.stem(x)))
        c4 = self.dark4(c3)
        c5 = self.dark5(c4)
        p5 = self.lateral5(c5)
        p4 = self.top_down4(torch.cat([self.up(p5), c4], 1))
        q4 = self.lateral4(p4)
        n3 = self.top_down3(torch.cat([self.up(q4), c3], 1))
        n4 = self.bottom_up4(torch.cat([self.down3(n3), q4], 1))
        n5 = self.bottom_up5(torch.cat([self.down4(n4), p5], 1))
        return tuple(head(level) for head, level in zip(self.heads, (n3, n4, n5)))


DETECTOR_SIZE = 416
DETECTOR_OUTPUTS = ["stride8", "stride16", "stride32"]
OBJECT_PRIOR = 0.01  # YOLOX starts scores at this probability (bias −4.6)


def detector(photos: np.ndarray, seed: int = 0) -> nn.Module:
    """A Detector with seeded random weights that behaves like a trained network: random
    BatchNorm scales and shifts, then its statistics measured on ``photos`` (N×3×416×416,
    range 0..1), so every layer sees normalized activations; score biases at YOLOX's prior."""
    _deterministic(seed)
    model = Detector()
    prior = -math.log((1 - OBJECT_PRIOR) / OBJECT_PRIOR)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.2)
                module.momentum = None  # cumulative average over the photos below
        for head in model.heads:
            head.obj.bias.fill_(prior)
            head.cls.bias.fill_(prior)
        model.train()
        for image in torch.from_numpy(photos):
            model(image[None])
    return model.eval()


def export_detector(model: nn.Module) -> bytes:
    """Opset 17, BatchNorm nodes kept (as the digits ResNet), three outputs [box 4, obj 1, classes]."""
    buffer = io.BytesIO()
    torch.onnx.export(
        model, torch.zeros(1, 3, DETECTOR_SIZE, DETECTOR_SIZE), buffer, opset_version=17, dynamo=False,
        input_names=["image"], output_names=DETECTOR_OUTPUTS, training=torch.onnx.TrainingMode.EVAL,
        do_constant_folding=False,
    )
    proto = onnx.load_from_string(buffer.getvalue())
    proto.producer_version = torch.__version__.split("+")[0]
    return proto.SerializeToString()
