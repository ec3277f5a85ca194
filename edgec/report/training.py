"""The fine-tuning section of ``report.html``: the loss curve and what training changed."""

from __future__ import annotations

from typing import Any

import jinja2

from edgec.report import plots

_SECTION = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined).from_string("""
<section id="finetune">
<h2>Fine-tuning</h2>
<p class="note">{{ f.samples }} training and {{ f.validation_samples }} validation samples from {{ f.data }},
{{ "labels and distillation" if f.labeled else "distillation from the source model (no labels)" }};
{{ f.epochs }} epoch(s), best {{ f.best_epoch }}, stopped by {{ f.stopped }}.
Validation {{ f.metric }}: {{ "%.4f"|format(f.before) }} before, {{ "%.4f"|format(f.after) }} after
(measured on the ONNX model in ONNX Runtime).</p>
{{ curve|safe }}
</section>
""")

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>edgec fine-tuning report</title>
<style>body { font-family: system-ui, sans-serif; margin: 2em auto; padding: 0 1em; max-width: 60em; color: #222; }
.note { color: #555; font-size: 0.9em; } svg { max-width: 100%; height: auto; }</style></head>
<body>
</body>
</html>
"""


def with_training(html: str | None, finetune: dict[str, Any]) -> str:
    """``html`` (a report page, or a new one) with the fine-tuning section before its end."""
    curve = plots.training_curve(finetune["losses"], finetune["validation_losses"], finetune["validation_metric"], finetune["metric"])
    section = _SECTION.render(f=finetune, curve=curve)
    page = html or _PAGE
    end = page.rindex("</body>")
    return page[:end] + section + page[end:]
