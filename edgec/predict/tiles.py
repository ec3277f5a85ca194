"""The micro-kernel tiles XNNPACK computes convolutions in, and the work they do.

XNNPACK runs a convolution or fully connected layer as a GEMM (an IGEMM, through an
indirection buffer, when the kernel is larger than 1×1 or strided): a micro-kernel computes
a tile of ``mr`` output pixels × ``nr`` output channels, stepping ``kr`` input channels at a
time, so a layer costs whole tiles: the pixels are padded to ``mr``, the output channels to
``nr`` and, per kernel tap, the input channels to ``kr``. A depthwise convolution computes
a tile of channels per output pixel. Which tiles (src/configs/gemm-config.c and
dwconv-config.c of XNNPACK), on aarch64 Linux as ai-edge-litert 2.1 bundles it (the same for
Cortex-A53 and A76 unless said):

* fp32 GEMM: ``6x8`` (mr 1, 4 or 6), input channels one at a time; ``4x2`` (the "nr2"
  micro-kernel) for layers whose output channels do not fill tiles of 8 (see
  :meth:`Tiling.narrow_layers`): several times the instructions per multiply-add;
* int8 GEMM: ``4x16`` (mr 1 or 4); with the dot-product instructions (Linux reports
  ``asimddp``: Cortex-A55, A76 and later) ``4x16c4``, four input channels per step (each
  tap's channels padded to 4); without (Cortex-A53), ``4x16`` multiply-accumulate by lane;
* depthwise: 8 channels at a time in fp32, 16 in int8, what remains past them 4 (fp32) or 8
  (int8) at a time, and a fixed number of kernel taps (``DEPTHWISE_TAPS``): one micro-kernel
  per tap count, each with its own cost per tap (:func:`variant`); on the in-order little
  cores (Cortex-A53, A55) the fp32 9-tap one is hand-written assembly of 4 channels a tile.

On x86-64 XNNPACK picks by the CPU's flags (``X86_GEMM``, first match): fp32 ``7x32`` with
AVX-512F and ``7x16`` as its narrow kernel, int8 ``16x64c4`` with AMX, ``7x16c8`` with
AVX-512 VNNI; depthwise 16 channels a tile in both precisions, a remainder computed as a
masked whole tile. Timed on this project's dev host (AVX-512F, AVX-512 VNNI, AMX), 1 thread:
an fp32 1×1 convolution at 28×28×64 costs the same from 33 to 64 output channels and again
from 65 to 96 (32-wide tiles), 8 to 24 channels run in 16-wide tiles (24 costs more than
32); its int8 twin steps at 64 channels and 16 pixels (AMX tiles); depthwise 3×3 steps
every 16 channels in fp32 and int8.

XNNPACK picks ``mr`` per layer from the number of output pixels (``xnn_get_heuristic_mr_gemm``:
an exact fit if one exists, else the fewest loads and multiply-adds); :func:`heuristic_mr`
does the same.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np

from edgec.profile.devices import Device

GEMM_KINDS = ("CONV_2D", "FULLY_CONNECTED", "BATCH_MATMUL")
NARROW_KINDS = ("CONV_2D", "FULLY_CONNECTED")  # fp32 kinds XNNPACK may give the narrow micro-kernel
DEPTHWISE = "DEPTHWISE_CONV_2D"
DEPTHWISE_TILE = {"fp32": 8, "int8": 16}
DEPTHWISE_STEP = {"fp32": 4, "int8": 8}  # channels per step past the whole tiles
# Kernel taps of the depthwise micro-kernels (dwconv-config.c); XNNPACK takes the smallest
# that holds a layer's taps, padding the rest with zero weights. fp32's single tap is the
# channel-wise multiply-add (vmulcaddc), which int8 lacks: its 1×1 runs in the 3-tap kernel.
DEPTHWISE_TAPS = {"fp32": (1, 3, 4, 9, 25), "int8": (3, 9, 25)}


@dataclasses.dataclass(frozen=True)
class Tiles:
    """A micro-kernel's tile: output pixels (one of ``mrs``, chosen per layer), output channels
    and input channels per step."""

    mrs: tuple[int, ...]
    nr: int
    kr: int = 1
    step: int = 0  # channels per step of the loop over what remains past whole tiles (0: a whole tile)


@dataclasses.dataclass(frozen=True)
class Tiling:
    """The micro-kernels one kernel kind runs in: ``wide`` normally; ``narrow`` (fp32 only)
    for layers whose output channels fill ``wide``'s tiles poorly (:meth:`narrow_layers`)."""

    kind: str
    wide: Tiles
    narrow: Tiles | None = None
    taps: tuple[int, ...] = ()  # the kernel taps micro-kernels come in, if they come in fixed ones

    def kernel_taps(self, taps: np.ndarray) -> np.ndarray:
        """The taps a layer's micro-kernel computes: the fewest of ``self.taps`` that hold its own."""
        if not self.taps:
            return taps
        sizes = np.array(self.taps, dtype=np.float64)
        smallest = np.where(sizes[None, :] >= taps[:, None], sizes[None, :], np.inf).min(axis=1)
        return np.where(np.isfinite(smallest), smallest, taps)  # more taps than any: a multipass kernel

    def narrow_layers(self, cout: np.ndarray, k: np.ndarray, stride: np.ndarray) -> np.ndarray:
        """Which layers XNNPACK runs in the narrow micro-kernel. A 1×1 convolution of stride 1
        is a fully connected layer to XNNPACK (src/subgraph/convolution-2d.c), and a fully
        connected layer takes the narrow one when the wide one has more columns than the
        layer has channels, or wastes more than 1% of them where the narrow one wastes fewer
        (``xnn_use_nr2``); any other convolution only in the first case."""
        if self.narrow is None:
            return np.zeros(cout.shape, dtype=bool)
        wide, narrow = self.wide.nr, self.narrow.nr
        wasted, narrow_wasted = (wide - cout % wide) % wide, (narrow - cout % narrow) % narrow
        fully_connected = (k <= 1) & (stride <= 1) if self.kind == "CONV_2D" else np.ones(cout.shape, dtype=bool)
        return (cout < wide) | (fully_connected & (narrow_wasted < wasted) & (wasted * 100 > cout))


@dataclasses.dataclass(frozen=True)
class Core:
    """What of a core decides XNNPACK's micro-kernels. arm64: the dot-product instructions,
    and whether it is an in-order little core (Cortex-A53/A55), which gets its own. x86-64:
    which of the flags in ``X86_GEMM`` its Linux reports (None: not an x86 core). On a timed
    device, a model's weights past its core's cache are read again every inference
    (``weights_streamed`` in edgec/predict/model.py)."""

    dot_product: bool = False
    little: bool = False
    x86: frozenset[str] | None = None
    cache_bytes: float = math.inf  # a core's own last cache (L2) where time is measured; instructions ignore it


LITTLE_PARTS = {"0xd03", "0xd05"}  # Cortex-A53, Cortex-A55 (the "CPU part" in /proc/cpuinfo)


def variant(kind: str, precision: str, k: int) -> int:
    """Which of a kind's micro-kernels a layer of kernel size ``k`` runs (0: the kind has one):
    a depthwise convolution's tap count."""
    if kind != DEPTHWISE:
        return 0
    taps = max(k, 1) ** 2
    return min((t for t in DEPTHWISE_TAPS.get(precision, ()) if t >= taps), default=taps)


NARROW_FP32 = Tiles((4,), 2)  # f32_gemm_nr2_config on arm64: 4x2 micro-kernels only
# x86-64: (flag, precision, GEMM tile, narrow tile), the first whose flag the core has. The
# amx_int8 and avx512f rows were timed on the dev host; the others are read from XNNPACK's
# gemm-config.c and untimed.
X86_GEMM = (
    ("amx_int8", "int8", Tiles((1, 16), 64, 4), None),
    ("avx512_vnni", "int8", Tiles((1, 7), 16, 8), None),
    ("avx2", "int8", Tiles((1, 3), 8, 8), None),
    ("avx512f", "fp32", Tiles((1, 7), 32), Tiles((1, 7), 16)),
    ("fma", "fp32", Tiles((1, 2, 5), 16), None),
)
X86_BASELINE = {"fp32": Tiles((1, 4), 8), "int8": Tiles((1, 3), 4, 8)}  # SSE2
X86_DEPTHWISE_TILE = {"fp32": 16, "int8": 16}  # with AVX2 or later; what remains is one masked tile


def gemm_tiles(precision: str, core: Core) -> Tiles:
    """The GEMM micro-kernel tile of ``precision`` on ``core`` (see the module docstring)."""
    return _gemm_tilings(precision, core)[0]


def _gemm_tilings(precision: str, core: Core) -> tuple[Tiles, Tiles | None]:
    """The wide GEMM tile and the narrow one (None: the core has no narrow kernel for it)."""
    if core.x86 is not None:
        return next(((wide, narrow) for flag, kind, wide, narrow in X86_GEMM if kind == precision and flag in core.x86),
                    (X86_BASELINE.get(precision, X86_BASELINE["fp32"]), None))
    if precision == "int8":
        return Tiles((1, 4), 16, 4 if core.dot_product else 1), None
    return Tiles((1, 4, 6), 8), NARROW_FP32


def kind_tiling(kind: str, precision: str, core: Core, taps: int = 0) -> Tiling | None:
    """How XNNPACK tiles kernel kind ``kind`` (None: not a tiled convolution); ``taps``: which
    depthwise micro-kernel (:func:`variant`)."""
    if kind in GEMM_KINDS:
        wide, narrow = _gemm_tilings(precision, core)
        return Tiling(kind, wide, narrow if kind in NARROW_KINDS else None)
    if kind == DEPTHWISE:
        tiles = Tiles((1,), DEPTHWISE_TILE.get(precision, 8), step=DEPTHWISE_STEP.get(precision, 0))
        if core.x86 is not None:
            tiles = Tiles((1,), X86_DEPTHWISE_TILE.get(precision, 16) if core.x86 & {"avx2", "avx512f"} else 8)
        elif precision == "fp32" and taps == 9 and core.little:
            tiles = Tiles((1,), 4)  # f32_dwconv 9p4c, cortex_a55 assembly
        return Tiling(kind, tiles, taps=DEPTHWISE_TAPS.get(precision, ()))
    return None


def heuristic_mr(pixels: np.ndarray, tiles: Tiles) -> np.ndarray:
    """XNNPACK's choice of ``mr`` for a layer of ``pixels`` output pixels: ``pixels`` itself
    if a micro-kernel has that many rows, else the least ceil(pixels/mr)·(3(mr+nr)+mr·nr)
    (the largest ``mr`` on a tie)."""
    pixels = np.asarray(pixels, dtype=np.float64)
    best = np.full(pixels.shape, float(max(tiles.mrs)))
    best_cost = np.full(pixels.shape, np.inf)
    for mr in sorted(tiles.mrs):
        cost = np.ceil(pixels / mr) * (3 * (mr + tiles.nr) + mr * tiles.nr)
        better = cost <= best_cost
        best, best_cost = np.where(better, mr, best), np.where(better, cost, best_cost)
    exact = np.isin(pixels, tiles.mrs)
    return np.where(exact, pixels, best)


def tiled(pixels: np.ndarray, cout: np.ndarray, taps: np.ndarray, depth: np.ndarray,
          tiles: Tiles) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The multiply-adds a layer's micro-kernel calls execute, padding included; how many
    tiles they compute; and how many steps over channels past the whole tiles (none where
    the micro-kernel computes a whole tile for them). ``pixels`` × ``cout`` outputs, ``taps``
    kernel taps of ``depth`` input channels each."""
    mr = heuristic_mr(pixels, tiles)
    rows = np.ceil(pixels / mr)
    if tiles.step:
        count, steps = rows * np.floor(cout / tiles.nr), rows * np.ceil(cout % tiles.nr / tiles.step)
    else:
        count, steps = rows * np.ceil(cout / tiles.nr), np.zeros(len(cout))
    channels = count * tiles.nr + steps * tiles.step
    return channels * mr * taps * np.ceil(depth / tiles.kr) * tiles.kr, count, steps


def core_of(device: Device) -> Core:
    """The device's core as its Linux reports it in /proc/cpuinfo (an emulated core's is the
    one its root file system fakes): ``asimddp`` among the features and the CPU part on
    arm64, the ``flags`` on x86-64. The default core where that cannot be read."""
    if device.emulation is not None:
        cpuinfo = device.emulation.root / device.emulation.cpu / "proc" / "cpuinfo"
    elif device.kind == "local":
        cpuinfo = Path("/proc/cpuinfo")
    else:
        return Core()
    try:
        core = core_from_cpuinfo(cpuinfo.read_text())
    except OSError:
        core = Core()
    return dataclasses.replace(core, cache_bytes=l2_bytes()) if device.kind == "local" else core


def l2_bytes(cpu: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> float:
    """The size of the local CPU's level-2 cache as Linux reports it (inf where it does not)."""
    for index in sorted(cpu.glob("index*")):
        try:
            if (index / "level").read_text().strip() == "2":
                size = (index / "size").read_text().strip()
                return float(size[:-1]) * {"K": 2 ** 10, "M": 2 ** 20}[size[-1]] if size[-1] in "KM" else float(size)
        except (OSError, ValueError):
            continue
    return math.inf


def core_from_cpuinfo(text: str) -> Core:
    """The core a /proc/cpuinfo describes (its first processor's lines decide)."""
    fields: dict[str, list[str]] = {}
    for name, value in (line.split(":", 1) for line in text.splitlines() if ":" in line):
        fields.setdefault(name.strip().lower(), value.split())
    if "flags" in fields:  # x86's /proc/cpuinfo; arm64's says "Features"
        return Core(x86=frozenset(flag for flag, *_ in X86_GEMM if flag in fields["flags"]))
    return Core("asimddp" in fields.get("features", []), bool(LITTLE_PARTS & set(fields.get("cpu part", []))))
