"""The report stage: report.json's record of what the build did (deterministic: no wall times)."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import onnx_ir as ir

from edgec import __version__
from edgec.analysis import summarize
from edgec.lower import Lowered
from edgec.passes.pipeline import PassRecord
from edgec.report import versions
from edgec.stages.context import BuildOptions
from edgec.targets import Target
from edgec.verify import Verification

def build_report(path: Path, target: Target, model: ir.Model, records: list[PassRecord], lowered: Lowered,
                 verification: Verification, options: BuildOptions) -> dict[str, Any]:
    content = path.read_bytes()
    return {
        "edgec_version": __version__,
        "status": "ok",
        "source": {
            "path": str(path),
            "sha256": hashlib.sha256(content).hexdigest(),
            "size_bytes": len(content),
        },
        "target": target.to_dict(),
        "options": {
            "input_shapes": {k: list(v) for k, v in options.input_shapes.items()},
            "seed": options.seed,
            "int8_io": options.int8_io,
            "images": dataclasses.asdict(options.images),
        },
        "model": summarize(model),
        "notes": [r.details["note"] for r in records if "note" in r.details],  # also shown as warnings
        "passes": [r.to_dict() for r in records],
        "lowering": lowered.details,
        "artifacts": [
            {"file": name, "size_bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            for name, data in lowered.files.items()
        ],
        "verification": verification.to_dict(),
        "versions": versions(),
    }
