"""The ``edgec`` command line: build, verify, profile, inspect, analyze, optimize, targets.

Errors a user can cause are printed as one paragraph on stderr (no traceback) with a
non-zero exit code; ``--debug`` shows the traceback for bug reports.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import json
import os
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from typer.exceptions import TyperException

from edgec import crash
from edgec.errors import DynamicShapeError, EdgecWarning, InputDataError, InternalError, OptionError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="edgec compiles ONNX models into verified TFLite and ONNX Runtime artifacts for ARM and x86 devices.",
)
out = Console()
err = Console(stderr=True)

InputShapeOpt = Annotated[
    Optional[list[str]],
    typer.Option("--input-shape", help="Pin a dynamic input: NAME=1x3x224x224 (or just the dims for a single-input model). Repeatable."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks (for bug reports).")]
ImageRangeOpt = Annotated[Optional[str], typer.Option(help="Image folders: pixel values 0..255 map onto LO,HI (default 0,1).")]
ImageMeanOpt = Annotated[Optional[str], typer.Option(help="Image folders: per-channel mean subtracted after scaling, e.g. 0.485,0.456,0.406.")]
ImageStdOpt = Annotated[Optional[str], typer.Option(help="Image folders: per-channel std divided by after the mean, e.g. 0.229,0.224,0.225.")]
ToleranceOpt = Annotated[Optional[float], typer.Option(help="Max abs error as a fraction of max |output|; overrides the target's (fp32 default 1e-4).")]
DevicesOpt = Annotated[Optional[Path], typer.Option("--devices", help="A device inventory .toml (default: targets/devices.toml).")]
MinCosineOpt = Annotated[Optional[float], typer.Option(help="Minimum cosine similarity of each output to the source's; overrides the target's (int8 default 0.98 TFLite, 0.99 ORT; 0 also turns off the int8 precision search).")]


def _handles_errors(fn):
    """Turn EdgecError into a one-paragraph message and its exit code, and any other
    exception (a bug) into one paragraph naming where it struck, a crash report outside the
    output directory, and exit code 70."""

    @functools.wraps(fn)
    def wrapper(*args, debug: bool = False, **kwargs):
        try:
            with crash.at("command", f"`edgec {fn.__name__}`"):
                return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, TyperException):
            raise
        except Exception as exc:
            if debug:
                raise
            if crash.is_bug(exc):
                err.print(f"[bold red]internal error:[/] {crash.bug_message(exc, crash.write_report(exc))}",
                          highlight=False, soft_wrap=True)
                raise typer.Exit(InternalError.exit_code) from None
            err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None

    return wrapper


def parse_input_shapes(specs: list[str] | None) -> dict[str, tuple[int, ...]]:
    """``["x=1x3x224x224"]`` → ``{"x": (1, 3, 224, 224)}``; a bare shape gets the key ""."""
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in specs or []:
        name, _, dims = spec.rpartition("=")
        if not re.fullmatch(r"\d+([x,]\d+)*", dims):
            raise DynamicShapeError(
                f"--input-shape '{spec}' is not of the form NAME=1x3x224x224.",
                hint="Give positive integer sizes separated by 'x'.",
            )
        shapes[name] = tuple(int(d) for d in re.split(r"[x,]", dims))
    return shapes


def parse_image_preprocess(value_range: str | None, mean: str | None, std: str | None):
    """``--image-range/--image-mean/--image-std`` → ImagePreprocess."""
    from edgec.images import ImagePreprocess

    low_high = _floats(value_range, "--image-range") if value_range else (0.0, 1.0)
    if len(low_high) != 2:
        raise InputDataError(f"--image-range takes two numbers LO,HI, not '{value_range}'.")
    return ImagePreprocess(low_high, _floats(mean, "--image-mean"), _floats(std, "--image-std"))


def _floats(text: str | None, option: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",")) if text else ()
    except ValueError:
        raise InputDataError(f"{option} takes comma-separated numbers, not '{text}'.") from None


class ConsoleProgress:
    """Shows each build stage with a spinner, then its wall time; passes as dim lines."""

    def __init__(self, console: Console, verbose: bool):
        self.console = console
        self.verbose = verbose

    @contextlib.contextmanager
    def stage(self, description: str):
        start = time.perf_counter()
        with self.console.status(description):
            yield
        self.console.print(f"[green]✓[/] {description} [dim]({time.perf_counter() - start:.1f} s)[/]", highlight=False)

    def epoch(self, info: dict) -> None:
        """One line per fine-tuning epoch: a bar of epochs done, the loss and the validation metric."""
        done = round(20 * info["epoch"] / info["epochs"])
        training = f"{info['training']} " if "training" in info else ""
        self.console.print(f"  {training}epoch {info['epoch']:>3}/{info['epochs']} [cyan]{'━' * done}[/][dim]{'━' * (20 - done)}[/] "
                           f"loss {info['loss']:.4f}  validation loss {info['validation_loss']:.4f}, metric {info['metric']:.4f} [dim]({info['seconds']:.1f} s)[/]",
                           highlight=False)

    def pass_done(self, record, seconds: float) -> None:
        if self.verbose:
            self.console.print(
                f"  [dim]{record.name}: {record.nodes_before}→{record.nodes_after} nodes {_brief(record.details)}[/]",
                highlight=False,
            )


def _brief(details: dict) -> str:
    text = json.dumps(details, separators=(",", ":"))
    return "" if text == "{}" else (text if len(text) < 100 else text[:97] + "...")


def _prints_warnings(fn):
    """Show the EdgecWarnings a command raises (notes about the model or its data: a default
    batch, stale declared shapes) as ``warning:`` lines on stderr as they come; other Python
    warnings are not shown (libraries' deprecations are not the user's to act on)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with warnings.catch_warnings():
            warnings.simplefilter("always", EdgecWarning)
            warnings.showwarning = _show_warning
            return fn(*args, **kwargs)

    return wrapper


def _show_warning(message, category, *_) -> None:
    if issubclass(category, EdgecWarning):
        err.print(f"[bold yellow]warning:[/] {message}", highlight=False, soft_wrap=True)


@app.command()
@_handles_errors
@_prints_warnings
def build(
    model: Annotated[Path, typer.Argument(help="The ONNX model to compile.")],
    target: Annotated[str, typer.Option("--target", "-t", help="Target name (see `edgec targets`) or a target .toml file.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory for the artifact(s) and report.json.")] = Path("build"),
    input_shape: InputShapeOpt = None,
    inputs: Annotated[Optional[Path], typer.Option("--inputs", help=".npz (arrays keyed by input name, samples on axis 0, optional 'label'), .npy, or a folder of images used to verify; seeded random data otherwise.")] = None,
    max_samples: Annotated[Optional[int], typer.Option(help="Verify on at most this many batches of --inputs.")] = None,
    precision: Annotated[Optional[str], typer.Option(help="fp32, fp16 or int8 (full-integer); the target's default otherwise.")] = None,
    calib: Annotated[Optional[Path], typer.Option("--calib", help="int8 calibration samples: .npz keyed by input name, .npy for one input (samples on axis 0), or a folder of images.")] = None,
    calib_samples: Annotated[int, typer.Option(help="Calibrate on at most this many batches of --calib.")] = 128,
    int8_io: Annotated[bool, typer.Option("--int8-io", help="int8 artifacts take and return int8 tensors (default: float I/O).")] = False,
    calib_method: Annotated[Optional[str], typer.Option(help="int8 activation ranges: minmax, mse (least squared quantization error), percentile or entropy (ORT only); the target's default otherwise.")] = None,
    max_drop: Annotated[Optional[float], typer.Option(help="int8: largest top-1 accuracy drop (0.01 = one point) on labeled --calib data; the most sensitive layers stay float until it holds.")] = None,
    keep_float: Annotated[Optional[list[str]], typer.Option("--keep-float", help="int8: keep this node in float. Repeatable.")] = None,
    speed_check: Annotated[bool, typer.Option(help="int8: time it against fp32 on this host (same arch as the target) and ship fp32 if int8 is not faster.")] = True,
    speed_device: Annotated[Optional[str], typer.Option("--speed-check-on", help="int8: do the speed check on this device of --devices instead of this host (e.g. emulated-a76 for an arm target: instructions per inference).")] = None,
    equalize: Annotated[Optional[bool], typer.Option("--equalize/--no-equalize", help="int8: cross-layer equalization across Relu/PRelu/LeakyRelu (exact); default: only for per-tensor weight schemes.")] = None,
    equalize_relu6: Annotated[bool, typer.Option("--equalize-relu6", help="int8: equalize across ReLU6 too, replacing it by Relu (changes the model slightly; AIMET's default).")] = False,
    equalize_activations: Annotated[Optional[bool], typer.Option("--equalize-activations/--no-equalize-activations", help="int8: shrink activation channels that set a tensor's int8 range into the next Conv's weights (exact; calibration data); default: on for per-channel weight schemes.")] = None,
    adaround: Annotated[bool, typer.Option("--adaround", help="int8: learn each weight's up/down rounding on --calib data (AdaRound), before bias correction.")] = False,
    bias_correction: Annotated[Optional[bool], typer.Option("--bias-correction/--no-bias-correction", help="int8: correct biases for the mean shift weight rounding causes; default: when it lowers the simulated int8 error on --calib data.")] = None,
    recipe: Annotated[Optional[Path], typer.Option("--recipe", help="Compression recipe: a TOML file of \\[\\[step]] tables (pass = \"...\" plus options), run after canonicalization, and an optional \\[build] table of build settings (precision, calib, keep_float...; flags given here win); the artifact is verified against the compressed model.")] = None,
    factorize: Annotated[Optional[list[str]], typer.Option("--factorize", help="Low-rank factorization step, e.g. mac_reduction=0.3 or energy=0.9,method=tucker2 (options: see README). Repeatable; runs after --recipe's steps.")] = None,
    prune: Annotated[Optional[list[str]], typer.Option("--prune", help="Remove whole channels, e.g. \"mac_reduction=0.3\" or \"rate=0.25,importance=l1,exclude=['conv1']\" (options: see README); re-fits the layers after on --calib data. Repeatable, runs after --recipe.")] = None,
    sparsify: Annotated[Optional[list[str]], typer.Option("--sparsify", help="Zero the smallest weights, e.g. \"sparsity=0.5\", \"pattern=2:4\" or \"sparsity=0.7,scope=global\" (smaller zipped files; no speed-up on ORT or TFLite). Repeatable, runs after --prune.")] = None,
    finetune: Annotated[Optional[Path], typer.Option("--finetune", help="Fine-tune after compression on these samples (same formats as --inputs): distillation from the source model, plus cross-entropy with a 'label' array. Saves <model>.finetuned.onnx.")] = None,
    epochs: Annotated[int, typer.Option(help="--finetune: at most this many epochs (early stopping on a held-back tenth).")] = 5,
    lr: Annotated[float, typer.Option(help="--finetune: Adam learning rate.")] = 1e-4,
    batch_size: Annotated[int, typer.Option(help="--finetune: samples per training step.")] = 32,
    finetune_budget_s: Annotated[Optional[float], typer.Option("--finetune-budget-s", help="--finetune: stop after the epoch that would overrun this many seconds.")] = None,
    qat: Annotated[bool, typer.Option("--qat", help="--finetune: quantization-aware training: train with weights and activations fake-quantized as int8 will quantize them, and quantize with the activation ranges it learns (needs --precision int8).")] = False,
    tolerance: ToleranceOpt = None,
    min_cosine: MinCosineOpt = None,
    image_range: ImageRangeOpt = None,
    image_mean: ImageMeanOpt = None,
    image_std: ImageStdOpt = None,
    seed: Annotated[int, typer.Option(help="Seed for random verification inputs.")] = 0,
    profile_device: Annotated[Optional[str], typer.Option("--profile", help="Profile the built artifact on this device (e.g. local); adds 'profile' to report.json and writes report.html.")] = None,
    devices: Annotated[Optional[Path], typer.Option("--devices", help="A device inventory .toml naming the --profile and --speed-check-on devices (default: targets/devices.toml).")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show every pass.")] = False,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Compile MODEL for a target, verify the artifact against MODEL, write artifacts and report.json."""
    from edgec.build import BuildOptions
    from edgec.build import build as run_build

    options = BuildOptions(
        input_shapes=parse_input_shapes(input_shape), inputs=str(inputs) if inputs else None, max_samples=max_samples,
        tolerance=tolerance, min_cosine=min_cosine, seed=seed, precision=precision,
        calib=str(calib) if calib else None, calib_samples=calib_samples, int8_io=int8_io,
        images=parse_image_preprocess(image_range, image_mean, image_std), calib_method=calib_method,
        max_drop=max_drop, keep_float=tuple(keep_float or ()), speed_check=speed_check, speed_device=speed_device, equalize=equalize,
        equalize_relu6=equalize_relu6, equalize_activations=equalize_activations, bias_correction=bias_correction, adaround=adaround, recipe=compose_recipe(recipe, factorize, prune, sparsify, finetune_step(finetune, epochs, lr, batch_size, finetune_budget_s, qat)),
        profile_device=profile_device, devices=str(devices) if devices else None,
    )
    if recipe:
        from edgec.recipe import load_build_settings, with_build_settings

        options = with_build_settings(options, load_build_settings(recipe))
    result = run_build(model, target, output, options, ConsoleProgress(err, verbose))
    if as_json:
        out.print_json(data=result.report)
        return
    _print_artifacts(result)
    _print_compression(result.report.get("compression"))
    _print_int8(result.report.get("int8"))
    _print_verification(result.verification.to_dict())
    if "profile" in result.report:
        _print_profile([result.report["profile"]])
    out.print(f"Report: [bold]{result.report_path}[/]", highlight=False)


def compose_recipe(recipe_file: Path | None, factorize: list[str] | None = None, prune: list[str] | None = None,
                   sparsify: list[str] | None = None, finetune=None) -> list:
    """The build's compression steps: the recipe file's, in file order, then the options',
    fine-tuning last."""
    from edgec.recipe import load_recipe, parse_step

    steps = load_recipe(recipe_file) if recipe_file else []
    steps += [parse_step("factorize", text) for text in factorize or ()]
    steps += [parse_step("prune", text) for text in prune or ()]
    steps += [parse_step("sparsify", text) for text in sparsify or ()]
    return steps + ([finetune] if finetune else [])


def finetune_step(data: Path | None, epochs: int, lr: float, batch_size: int, budget_s: float | None, qat: bool = False):
    """The ``finetune`` recipe step of ``--finetune DATA`` and its options, or None."""
    from edgec.recipe import Step

    if data is None:
        if qat:
            raise OptionError("--qat is a way of fine-tuning, and no --finetune DATA is given.",
                              hint="Add --finetune DATA (training samples), or use a recipe's finetune step with qat = true.")
        return None
    options = {"data": str(data), "epochs": epochs, "lr": lr, "batch_size": batch_size}
    return Step("finetune", options | ({"budget_s": budget_s} if budget_s is not None else {}) | ({"qat": True} if qat else {}))


def _print_compression(compression: dict | None) -> None:
    if not compression:
        return
    macs, params = compression["macs"], compression["params"]
    out.print(f"Compressed: MACs {macs['before']:,} → {macs['after']:,} ({compression['mac_reduction']:.1%} fewer), "
              f"parameters {params['before']:,} → {params['after']:,}", highlight=False)
    for o in compression["vs_source"]["outputs"]:
        agree = f", top-1 agreement {o['top1_agreement']:.3f}" if "top1_agreement" in o else ""
        acc = f", accuracy {o['accuracy_source']:.3f} → {o['accuracy_artifact']:.3f}" if "accuracy_source" in o else ""
        out.print(f"  vs source, output {o['name']}: cosine {o['cosine']:.5f}{agree}{acc}", highlight=False)


def _print_int8(int8: dict | None) -> None:
    """What an int8 request got: the share of MACs in int8 and the layers kept float."""
    if not int8:
        return
    built = int8["int8_artifact"]
    if built["int8_macs_fraction"] is None:
        return
    shipped = "" if int8["shipped"] == "int8" else " (the speed check shipped fp32 instead: 0% of MACs in int8)"
    layers = built["float_layers"]
    named = ", ".join(f"{layer['name']} ({layer['why']})" for layer in layers[:MAX_LISTED])
    more = f" and {len(layers) - MAX_LISTED} more (report.json → int8)" if len(layers) > MAX_LISTED else ""
    out.print(f"int8: {built['int8_macs_fraction']:.1%} of {built['macs']:,} MACs run in int8{shipped}"
              f"{f'; float layers: {named}{more}' if layers else ''}", highlight=False)


MAX_LISTED = 5  # float layers named on the console


def _print_artifacts(result) -> None:
    for entry in result.report["artifacts"]:
        out.print(f"Artifact: {result.report_path.parent / entry['file']} ({entry['size_bytes'] / 1024:.1f} KiB)", highlight=False)


def _print_verification(v: dict) -> None:
    required = ", ".join(f"{k} {val:g}" for k, val in v["criterion"].items())
    table = Table(title=f"Verification ({v['inputs']['source']}; {required})", title_justify="left")
    for col in ("output", "max err", "rel err", "cosine", "top-1 agree", "acc src→art", "ok"):
        table.add_column(col, no_wrap=True)
    for o in v["outputs"]:
        acc = f"{o['accuracy_source']:.3f}→{o['accuracy_artifact']:.3f}" if "accuracy_source" in o else "-"
        agree = f"{o['top1_agreement']:.3f}" if "top1_agreement" in o else "-"
        table.add_row(o["name"], f"{o['max_abs_error']:.2g}", f"{o['relative_error']:.2g}", f"{o['cosine']:.6f}", agree, acc, "✓" if o["passed"] else "✗")
    out.print(table)


@app.command()
@_handles_errors
@_prints_warnings
def verify(
    source: Annotated[Path, typer.Argument(help="The source ONNX model.")],
    artifact: Annotated[Path, typer.Argument(help="An artifact built from it (.tflite, .onnx or .ort).")],
    inputs: Annotated[Optional[Path], typer.Option("--inputs", help="Inputs file, as for build.")] = None,
    max_samples: Annotated[Optional[int], typer.Option(help="Verify on at most this many batches.")] = None,
    tolerance: ToleranceOpt = None,
    min_cosine: MinCosineOpt = None,
    image_range: ImageRangeOpt = None,
    image_mean: ImageMeanOpt = None,
    image_std: ImageStdOpt = None,
    seed: Annotated[int, typer.Option(help="Seed for random inputs.")] = 0,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Run SOURCE and ARTIFACT on the same inputs and compare their outputs."""
    from edgec.build import BuildOptions
    from edgec.runtime import open_runner
    from edgec.stages.context import SilentProgress
    from edgec.stages.data import verification_inputs
    from edgec.stages.source import check_runs, source_runner
    from edgec.targets import DEFAULT_CRITERIA
    from edgec.verify import compare

    options = BuildOptions(inputs=str(inputs) if inputs else None, max_samples=max_samples, seed=seed, tolerance=tolerance,
                           min_cosine=min_cosine, images=parse_image_preprocess(image_range, image_mean, image_std))
    given = tolerance is not None or min_cosine is not None
    criterion = DEFAULT_CRITERIA["fp32"]  # its noise floor stays under a given tolerance, as in build
    criterion = dataclasses.replace(criterion, tolerance=tolerance, min_cosine=min_cosine) if given else criterion
    reference, built = source_runner(source), open_runner(artifact)
    data = verification_inputs(built, options)
    check_runs(reference, data, SilentProgress())  # as in build: a crash of ONNX Runtime becomes an error
    result = compare(reference, built, data, criterion).to_dict()
    if as_json:
        out.print_json(data=result)
    else:
        _print_verification(result)
    if not result["passed"]:
        raise typer.Exit(3)


@app.command()
@_handles_errors
@_prints_warnings
def profile(
    artifacts: Annotated[list[Path], typer.Argument(help="Artifacts to measure (.tflite, .onnx, .ort).")],
    device: Annotated[str, typer.Option("--device", "-d", help="Device to measure on.")] = "local",
    devices: Annotated[Optional[Path], typer.Option("--devices", help="A device inventory .toml (default: targets/devices.toml).")] = None,
    runs: Annotated[int, typer.Option(help="Timed runs (at most, with --budget-s).")] = 50,
    warmup: Annotated[int, typer.Option(help="Untimed runs first.")] = 10,
    budget_s: Annotated[Optional[float], typer.Option("--budget-s", help="Stop timing after this many seconds (at least 3 runs).")] = None,
    threads: Annotated[Optional[int], typer.Option(help="Runtime threads (default: the device's CPUs).")] = None,
    ops: Annotated[bool, typer.Option("--ops/--no-ops", help="Per-op breakdown with the runtime's profiler.")] = True,
    seed: Annotated[int, typer.Option(help="Seed for the random inputs.")] = 0,
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory for profile.json and report.html.")] = Path("build/profile"),
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Measure latency (and where it goes, per op) of ARTIFACTS on a device; write profile.json and report.html."""
    from edgec.outputs import OutputDir
    from edgec.profile import ProfileSettings, built_for, foreign_device_warning, get_device
    from edgec.profile import profile as run_profile
    from edgec.report import write_json
    from edgec.report.profile import profile_report, render_html

    settings = ProfileSettings(warmup=warmup, runs=runs, budget_s=budget_s, threads=threads, ops=ops, seed=seed)
    target_device = get_device(device, devices)
    out_dir = OutputDir(output)
    try:
        measurements = []
        for artifact in artifacts:
            target = built_for(artifact)
            foreign = target and foreign_device_warning(artifact.name, target.get("name", "?"), target.get("arch", "?"), target_device)
            if foreign:
                err.print(f"[bold yellow]warning:[/] {foreign}", highlight=False, soft_wrap=True)
            with err.status(f"Profiling {artifact.name} on {device}"):
                measurements.append(run_profile(artifact, target_device, settings))
            measurements[-1]["predicted"] = _predicted_beside(artifact, target_device, measurements[-1])
        report = profile_report(measurements, settings)
        files = {"report.html": render_html(report).encode(), "profile.json": write_json(report)}
        written = out_dir.commit(files, last="profile.json")
    except BaseException:
        out_dir.discard()
        raise
    if as_json:
        out.print_json(data=report)
        return
    _print_profile(measurements)
    out.print(f"Report: [bold]{written[0]}[/], [bold]{written[1]}[/]", highlight=False)


def _predicted_beside(artifact: Path, device, measurement: dict) -> dict | None:
    """The device predictor's cost for ``artifact`` beside what was measured (median ms, or
    instructions on an emulated core), or None without a predictor or for a non-.tflite."""
    from edgec.predict import PredictorMissing, predict_cost

    if artifact.suffix.lower() != ".tflite":
        return None
    try:
        predicted = predict_cost(artifact, device)
    except PredictorMissing:
        return None
    cost = measurement.get("cost")
    metric, measured = ("instructions", cost["instructions"]) if cost else ("ms", measurement["latency_ms"]["median"])
    return {"metric": metric, "value": predicted, "error": predicted / measured - 1}


def _print_profile(measurements: list[dict]) -> None:
    """Stats with one column per measurement (fits a terminal for a few artifacts), then top ops."""
    from edgec.report.profile import labels

    names = labels(measurements)
    table = Table("", title="Latency (ms)", title_justify="left")
    for m, name in zip(measurements, names):
        device = m["device"]["name"] + (" (emulated)" if m["device"]["emulated"] else "")
        table.add_column(f"{name}\n{device}", justify="right")
    for row, cell in _PROFILE_ROWS:
        table.add_row(row, *(cell(m) for m in measurements))
    out.print(table)
    for m, name in zip(measurements, names):
        ops = m.get("ops") or {}
        if ops.get("by_type"):
            top = ", ".join(f"{t['op']} {t['ms']:.3g} ms ({t['share'] * 100:.0f}%)" for t in ops["by_type"][:5])
            out.print(f"Top ops, {name}: {top}", highlight=False, soft_wrap=True)
        elif "unavailable" in ops:
            out.print(f"No per-op breakdown for {name}: {ops['unavailable']}", highlight=False, soft_wrap=True)


def _number(value) -> str:
    return "-" if value is None else f"{value:.4g}"


_PROFILE_ROWS = [
    ("runtime", lambda m: f"{m['runtime']['name']} {m['runtime']['version']}"),
    ("threads", lambda m: str(m["runtime"]["threads"])),
    ("load", lambda m: _number(m.get("load_ms"))),
    *((key, lambda m, key=key: _number(m["latency_ms"][key])) for key in ("median", "min", "mean", "p90", "p99", "std")),
    ("runs", lambda m: str(m["latency_ms"]["runs"])),
    ("peak RSS MB", lambda m: _number(m.get("peak_memory_mb"))),
    ("ops total", lambda m: _number((m.get("ops") or {}).get("total_ms"))),
    ("unaccounted", lambda m: f"{m['ops']['unaccounted_share'] * 100:.1f}%" if (m.get("ops") or {}).get("unaccounted_share") is not None else "-"),
    ("predicted", lambda m: f"{m['predicted']['value']:.4g} {m['predicted']['metric']} ({m['predicted']['error']:+.0%})" if m.get("predicted") else "-"),
]


@app.command()
@_handles_errors
@_prints_warnings
def inspect(
    model: Annotated[Path, typer.Argument(help="The ONNX model to describe.")],
    input_shape: InputShapeOpt = None,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Inputs, outputs, op histogram, parameters, MACs per layer and file size."""
    from edgec.analysis import inspect_file

    summary = inspect_file(model, parse_input_shapes(input_shape))
    if as_json:
        out.print_json(data=summary)
        return
    _print_summary(summary)


def _print_summary(s: dict) -> None:
    out.print(f"[bold]{s['file']}[/] ({s['size_bytes'] / 1024:.1f} KiB, opset {s['opset']}, {s['producer'] or 'unknown producer'})", highlight=False)
    for kind in ("inputs", "outputs"):
        for v in s[kind]:
            shape = "x".join(map(str, v["shape"])) if v["shape"] is not None else "?"
            out.print(f"  {kind[:-1]:6} {v['name']}: {v['dtype']}[{shape}]", highlight=False, markup=False)  # [batchx3] is no tag
    out.print(f"Nodes {s['nodes']}, parameters {s['params']:,}, MACs {s['macs']:,}", highlight=False)
    out.print("Ops: " + ", ".join(f"{k} {v}" for k, v in s["op_histogram"].items()), highlight=False)
    table = Table("layer", "op", "output", "params", "MACs", title="MACs per layer", title_justify="left")
    for row in s["layers"]:
        macs = f"{row['macs']:,}" if row["macs"] is not None else "?"
        table.add_row(row["name"], row["op"], "x".join(map(str, row["output_shape"])), f"{row['params']:,}", macs)
    out.print(table)
    if s["macs_unknown_layers"]:
        err.print(f"[yellow]note:[/] MACs unknown for {len(s['macs_unknown_layers'])} layer(s) with dynamic shapes; pin them with --input-shape.")


@app.command()
@_handles_errors
@_prints_warnings
def analyze(
    model: Annotated[Path, typer.Argument(help="The ONNX model to analyze.")],
    sensitivity: Annotated[bool, typer.Option("--sensitivity", help="Prune each channel group alone at several rates and measure the output error / top-1 drop.")] = False,
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory for sensitivity.json and sensitivity.png.")] = Path("analysis"),
    inputs: Annotated[Optional[Path], typer.Option("--inputs", help="Samples the error is measured on (.npz with optional 'label', .npy, image folder); --calib's otherwise.")] = None,
    calib: Annotated[Optional[Path], typer.Option("--calib", help="Calibration samples for activation importance and reconstruction; --inputs' otherwise.")] = None,
    rates: Annotated[str, typer.Option(help="Comma-separated pruning rates to try per group.")] = "0.1,0.2,0.3,0.5,0.7",
    importance: Annotated[str, typer.Option(help="Channel importance: l1, l2 or activation.")] = "l1",
    reconstruct: Annotated[bool, typer.Option("--reconstruct", help="Re-fit the layers after each pruned group (slower; what `build --prune` does).")] = False,
    max_samples: Annotated[int, typer.Option(help="Use at most this many batches of each data set.")] = 64,
    input_shape: InputShapeOpt = None,
    image_range: ImageRangeOpt = None,
    image_mean: ImageMeanOpt = None,
    image_std: ImageStdOpt = None,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Analyses that help choose compression settings (for now: --sensitivity)."""
    from edgec.build import canonicalize, input_specs
    from edgec.checks import at_least, one_of, within
    from edgec.errors import RecipeError
    from edgec.model import load
    from edgec.outputs import OutputDir
    from edgec.passes.channel_pruning import OWN_IMPORTANCE
    from edgec.report import write_json
    from edgec.sensitivity import plot, sensitivity as measure
    from edgec.verify import load_inputs

    if not sensitivity:
        raise RecipeError("Choose an analysis.", hint="Pass --sensitivity.")
    if inputs is None and calib is None:
        raise InputDataError("--sensitivity needs real samples.", hint="Pass --inputs (labeled .npz gives the top-1 drop) and/or --calib.")
    pruning_rates = _floats(rates, "--rates")
    for rate in pruning_rates:
        within("--rates", rate, 0, 1, include_high=False)
    one_of("--importance", importance, OWN_IMPORTANCE)  # gates need training, which analyze does not do
    at_least("--max-samples", max_samples, 1)
    canonical, _ = canonicalize(load(model), parse_input_shapes(input_shape))
    specs = input_specs(canonical)
    images = parse_image_preprocess(image_range, image_mean, image_std)
    samples = load_inputs(inputs or calib, specs, limit=max_samples, images=images)
    calibration = load_inputs(calib, specs, limit=max_samples, images=images) if calib else samples
    report = measure(canonical, samples, calibration, pruning_rates, importance, reconstruct)
    files = {"sensitivity.png": plot(report), "sensitivity.json": write_json(report)}
    OutputDir(output).commit(files, last="sensitivity.json")
    if as_json:
        out.print_json(data=report)
        return
    table = Table("group", "channels", *(f"rate {r:g}" for r in report["rates"]), title="Sensitivity: " + (
        "top-1 drop" if report["samples"]["labeled"] else "relative output error") + " (MACs removed)", title_justify="left")
    key = "top1_drop" if report["samples"]["labeled"] else "relative_error"
    for group in report["groups"]:
        name = group["layers"][0] + (f" +{len(group['layers']) - 1}" if len(group["layers"]) > 1 else "")
        table.add_row(name, str(group["channels"]), *(f"{p[key]:.3g} ({p['mac_reduction']:.1%})" for p in group["curve"]))
    out.print(table)
    if report["frozen_groups"]:
        err.print(f"[yellow]note:[/] {len(report['frozen_groups'])} group(s) cannot be pruned; reasons in {output / 'sensitivity.json'}.")
    out.print(f"Report: [bold]{output / 'sensitivity.json'}[/], plot: [bold]{output / 'sensitivity.png'}[/]", highlight=False)


@app.command()
@_handles_errors
@_prints_warnings
def targets(as_json: JsonOpt = False, debug: DebugOpt = False) -> None:
    """List the known targets."""
    from edgec.targets import TARGETS_DIR, known_targets, load_target

    specs = [load_target(name).to_dict() for name in known_targets()]
    if as_json:
        out.print_json(data=specs)
        return
    table = Table("target", "backend", "arch", "precision", "threads", "description", title=f"Targets in {TARGETS_DIR}", title_justify="left")
    for t in specs:
        table.add_row(t["name"], t["backend"], t["arch"], t["precision"], str(t["threads"]), t["description"])
    out.print(table)


ExecutorOpt = Annotated[str, typer.Option(help="Where the work runs: local (this process) or ray (tasks on a Ray cluster).")]
RayAddressOpt = Annotated[Optional[str], typer.Option("--ray-address", help="--executor ray: an existing cluster (e.g. 127.0.0.1:6379, ray://HEAD:10001); a local Ray is started without it.")]


@app.command()
@_handles_errors
@_prints_warnings
def optimize(
    model: Annotated[Path, typer.Argument(help="The ONNX model to optimize.")],
    target: Annotated[str, typer.Option("--target", "-t", help="Target name (see `edgec targets`) or a target .toml file.")],
    eval_data: Annotated[Path, typer.Option("--eval", help="Held-out samples accuracy is judged on (labeled .npz: top-1 drop; else worst output cosine). Keep them apart from --calib and --finetune data.")],
    device: Annotated[str, typer.Option("--device", "-d", help="Where cost is measured: local (latency), an emulated core (instructions), an SSH board of --devices.")] = "local",
    latency_budget: Annotated[Optional[float], typer.Option("--latency-budget", help="Budget: latency in ms on --device (a timed device).")] = None,
    speedup: Annotated[Optional[float], typer.Option("--speedup", help="Budget: this many times cheaper than the fp32 build of the target on --device.")] = None,
    size_budget: Annotated[Optional[float], typer.Option("--size-budget", help="Budget: artifact size in KiB.")] = None,
    macs_budget: Annotated[Optional[int], typer.Option("--macs-budget", help="Budget: multiply-accumulates per inference.")] = None,
    max_drop: Annotated[Optional[float], typer.Option(help="Largest top-1 drop on labeled --eval (0.01 = one point; default 0.01).")] = None,
    min_cosine: Annotated[Optional[float], typer.Option(help="Lowest worst-output cosine on unlabeled --eval (default 0.99).")] = None,
    strategy: Annotated[str, typer.Option(help="greedy (NetAdapt-style), evolutionary (NSGA-II), bayesian (TPE) or random.")] = "greedy",
    trials: Annotated[int, typer.Option(help="Candidates to build and measure at most (a resumed study's count).")] = 40,
    time_budget_s: Annotated[Optional[float], typer.Option("--time-budget-s", help="Start no trial after this many seconds.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the sampler and of the builds.")] = 0,
    study: Annotated[Optional[str], typer.Option("--study", help="Study storage: a SQLite file or a database URL (default OUT/study.db); an interrupted search resumes from it.")] = None,
    calib: Annotated[Optional[Path], typer.Option("--calib", help="Calibration samples (int8, pruning re-fits, sensitivity); not the --eval data.")] = None,
    finetune: Annotated[Optional[Path], typer.Option("--finetune", help="Training samples: fine-tuning after compression becomes a knob of the search (greedy turns it on where one-shot moves lose too much accuracy, and for its last point).")] = None,
    epochs: Annotated[int, typer.Option(help="--finetune: at most this many epochs.")] = 5,
    lr: Annotated[float, typer.Option(help="--finetune: Adam learning rate.")] = 1e-4,
    batch_size: Annotated[int, typer.Option(help="--finetune: samples per training step.")] = 32,
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory for the artifact, report.json, recipe.toml, search.json, report.html and study.db.")] = Path("optimized"),
    executor: ExecutorOpt = "local",
    ray_address: RayAddressOpt = None,
    batch: Annotated[int, typer.Option(help="Candidates in flight at once (on Ray: evaluated at once); same --batch, same choice on either executor.")] = 2,
    cost: Annotated[str, typer.Option(help="measured (on --device) or predicted (by its latency predictor, `edgec device calibrate`; the Pareto front is measured before choosing).")] = "measured",
    input_shape: InputShapeOpt = None,
    image_range: ImageRangeOpt = None,
    image_mean: ImageMeanOpt = None,
    image_std: ImageStdOpt = None,
    devices: DevicesOpt = None,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Search pruning, factorization and precision for the most accurate artifact meeting a budget on a device."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from edgec.search import Budgets, OptimizeOptions
    from edgec.search import optimize as run_optimize

    step = finetune_step(finetune, epochs, lr, batch_size, None)
    options = OptimizeOptions(
        eval=str(eval_data), budgets=Budgets(latency_budget, speedup, size_budget, macs_budget), device=device,
        devices=str(devices) if devices else None, calib=str(calib) if calib else None, finetune=step.options if step else None,
        max_drop=max_drop, min_cosine=min_cosine, strategy=strategy, trials=trials, time_budget_s=time_budget_s, seed=seed,
        study=study, input_shapes=parse_input_shapes(input_shape), images=parse_image_preprocess(image_range, image_mean, image_std),
        executor=executor, ray_address=ray_address, batch=batch, cost=cost)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("[dim]{task.fields[best]}"), console=err) as bar:
        task = bar.add_task("Searching", total=trials, best="no feasible candidate yet")
        result = run_optimize(model, target, output, options,
                              lambda done, total, _, best: bar.update(task, completed=done, best=f"best: {_best_text(best)}"))
    if as_json:
        out.print_json(data=result.search)
        return
    chosen = result.chosen
    out.print(f"Chosen (trial {chosen['trial']} of {result.search['trials']}): {_best_text(chosen)}, "
              f"{chosen['size_bytes'] / 1024:.1f} KiB, {chosen['macs']:,} MACs", highlight=False)
    out.print(f"Artifact, recipe.toml, search.json, report.html: [bold]{output}[/]", highlight=False)


def _best_text(result: dict | None) -> str:
    if result is None:
        return "no feasible candidate yet"
    from edgec.search.space import describe

    return (f"{describe(result['settings'])}, {result['relative_cost']:.3f}× fp32 cost "
            f"({result['cost']:.4g} {result['metric']}), accuracy {result['accuracy']:.4f}")


# --- Latency prediction (edgec/predict): `edgec device calibrate D`, `edgec predict ARTIFACT... --device D`.
device_app = typer.Typer(no_args_is_help=True, help="Devices: calibrate a latency predictor.")
app.add_typer(device_app, name="device")
CacheOpt = Annotated[Optional[Path], typer.Option("--cache-dir", help="Where predictors are kept (default: $EDGEC_CACHE_DIR or ~/.cache/edgec).")]


@device_app.command("calibrate")
@_handles_errors
def calibrate(
    device: Annotated[str, typer.Argument(help="Device to calibrate (local, emulated-a53, emulated-a76).")],
    minutes: Annotated[float, typer.Option("--minutes", help="Measure for about this long, then fit (0: refit on what was measured).")] = 10.0,
    threads: Annotated[Optional[int], typer.Option(help="Runtime threads (default: the device's).")] = None,
    cache_dir: CacheOpt = None,
    devices: DevicesOpt = None,
    executor: ExecutorOpt = "local",
    ray_address: RayAddressOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Measure single-kernel models on DEVICE and fit its latency predictor; resumes an interrupted run."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from edgec.checks import at_least
    from edgec.executors import make_executor
    from edgec.predict import PredictorStore, cache_dir as cache_folder
    from edgec.predict.calibrate import calibrate as run_calibration
    from edgec.profile import get_device

    at_least("--minutes", minutes, 0)
    at_least("--threads", threads, 1)
    target = get_device(device, devices)
    store = PredictorStore(cache_folder(cache_dir), target.name)
    runner = make_executor(executor, ray_address)
    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[samples]} samples"),
                      TimeRemainingColumn(), console=err) as bar:
            task = bar.add_task(f"Calibrating {target.name}", total=minutes * 60, samples=len(store.samples()))
            predictor = run_calibration(target, store, minutes, threads or target.threads,
                                        lambda samples, seconds: bar.update(task, completed=seconds, samples=samples), executor=runner)
    finally:
        runner.close()
    kinds = ", ".join(f"{key} ({n})" for key, n in predictor.summary()["kernels"].items())
    out.print(f"Predictor for [bold]{target.name}[/] ({predictor.metric}) in {store.folder}: {kinds}", highlight=False)


@app.command()
@_handles_errors
def predict(
    artifacts: Annotated[list[Path], typer.Argument(help=".tflite artifacts to predict.")],
    device: Annotated[str, typer.Option("--device", "-d", help="A device with a predictor (edgec device calibrate D).")] = "local",
    cache_dir: CacheOpt = None,
    devices: DevicesOpt = None,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Predicted latency (instructions on an emulated core) of ARTIFACTS on a device, kernel by kernel."""
    from edgec.predict import predict as run_predict
    from edgec.profile import get_device

    target = get_device(device, devices)
    predictions = [run_predict(artifact, target, cache_dir) for artifact in artifacts]
    if as_json:
        out.print_json(data={"predictions": predictions})
        return
    for p in predictions:
        unit = "ms" if p["metric"] == "ms" else " instructions"
        out.print(f"[bold]{p['artifact']}[/] on {p['device']}: {p['predicted']:,.4g}{unit} predicted", highlight=False)
        table = Table("kernel", "precision", "count", "share")
        for kind, rows in _by_kind(p["kernels"]).items():
            share = sum(r["share"] or 0 for r in rows)
            table.add_row(kind[0], kind[1], str(len(rows)), "unknown" if rows[0]["predicted"] is None else f"{share:.1%}")
        out.print(table)
        if p["unknown"]:
            err.print(f"[yellow]note:[/] no regressor for {', '.join(p['unknown'])}: their cost is not in the prediction.", highlight=False)


def _by_kind(kernels: list[dict]) -> dict[tuple[str, str], list[dict]]:
    groups: dict[tuple[str, str], list[dict]] = {}
    for k in kernels:
        groups.setdefault((k["kind"], k["precision"]), []).append(k)
    return dict(sorted(groups.items(), key=lambda kv: -sum(r["share"] or 0 for r in kv[1])))


def main() -> None:
    """The ``edgec`` command (and ``python -m edgec``). Once a command is done (its files
    written, its output printed) the process ends without tearing down the modules it
    imported: TensorFlow's teardown took over a second (the digits MLP's TFLite build: 4.4-4.9 s
    before, 3.4-3.7 s after). Exit handlers still run (temporary files, child processes)."""
    try:
        app(prog_name="edgec")
        code = 0
    except SystemExit as exc:
        code = _exit_code(exc)
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _exit_code(exc: SystemExit) -> int:
    """The status ``sys.exit(exc.code)`` would end with."""
    if exc.code is None or isinstance(exc.code, int):
        return exc.code or 0
    print(exc.code, file=sys.stderr)
    return 1
