"""The profiling stage: the artifact measured on the asked device, with its report.html."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from edgec.lower import Lowered
from edgec.profile import ProfileSettings, profile
from edgec.stages.context import BuildOptions

def profile_artifact(lowered: Lowered, options: BuildOptions, out_dir: Path) -> tuple[dict[str, Any], bytes]:
    """Measure the primary artifact on the asked device: the measurement and its report.html."""
    from edgec.report.profile import profile_report, render_html

    settings = options.profile_settings or ProfileSettings(seed=options.seed)  # the device's own threads
    with tempfile.TemporaryDirectory(prefix="edgec-profile-") as tmp:
        path = Path(tmp) / lowered.primary
        path.write_bytes(lowered.files[lowered.primary])
        measurement = profile(path, options.profile_device, settings)
    measurement["artifact"]["path"] = str(out_dir / lowered.primary)
    return measurement, render_html(profile_report([measurement], settings)).encode()
