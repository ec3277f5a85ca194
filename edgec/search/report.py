"""report.html of ``edgec optimize``: the Pareto front, the chosen point, the baselines and
the chosen candidate's per-layer choices, from search.json's data alone."""

from __future__ import annotations

import html
from typing import Any

from edgec.report.plots import pareto

BUDGET_NAMES = {"latency_ms": "latency (ms)", "speedup": "speed-up over fp32", "size_kb": "size (KiB)", "macs": "MACs"}


def front(points: list[dict[str, Any]]) -> list[int]:
    """Indices of the points no other point beats on both cost and loss."""
    return [i for i, p in enumerate(points)
            if not any(q["relative_cost"] <= p["relative_cost"] and q["loss"] <= p["loss"]
                       and (q["relative_cost"], q["loss"]) != (p["relative_cost"], p["loss"]) for q in points)]


def render(search: dict[str, Any], target: str) -> str:
    """The self-contained HTML page (inline SVG, no external references)."""
    built = [c for c in search["candidates"] if "error" not in c]
    index = search["chosen"] if search["chosen"] is not None else search["closest"]
    picked = search["candidates"][index]
    position = next(i for i, c in enumerate(built) if c["trial"] == picked["trial"])
    baselines = {name: b for name, b in search["baselines"].items() if b and "error" not in b}
    metric = picked["metric"]
    plot = pareto(built, front(built), position, baselines, f"cost relative to fp32 on {search['device']} ({metric})",
                  "top-1 on --eval" if search["accuracy"]["measure"] == "top1" else "worst output cosine on --eval",
                  1 / search["budgets"]["speedup"] if "speedup" in search["budgets"] else None)
    verdict = ("meets every budget" if search["chosen"] is not None else
               "<b>misses</b> a budget or the accuracy bound: no candidate met them; this is the closest (OUT/closest/)")
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>edgec optimize: {html.escape(search['model'])}</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:1em auto}}td,th{{padding:2px 8px;text-align:left}}</style></head><body>
<h1>edgec optimize</h1>
<p>{html.escape(search['model'])} for {html.escape(target)}, cost on {html.escape(search['device'])}; strategy
{search['strategy']} (seed {search['seed']}), {search['trials']} trials; budgets: {_budgets(search['budgets'])};
allowed loss {search['accuracy']['allowed_loss']:g} ({search['accuracy']['measure']}).</p>
<p>The chosen candidate (trial {picked['trial']}) {verdict}.</p>
{plot}
<h2>Chosen vs baselines</h2>{_table({'chosen': picked, **search['baselines']})}
<h2>Per-layer choices of the chosen candidate</h2>{_choices(picked['settings'])}
</body></html>
"""


def _budgets(budgets: dict[str, float]) -> str:
    return ", ".join(f"{BUDGET_NAMES[k]} {v:g}" for k, v in budgets.items())


def _table(rows: dict[str, dict[str, Any] | None]) -> str:
    head = "<tr><th></th><th>cost</th><th>× fp32</th><th>accuracy</th><th>loss</th><th>size (KiB)</th><th>MACs</th><th>meets</th></tr>"
    body = []
    for name, r in rows.items():
        if r is None:
            continue
        if "error" in r:
            body.append(f"<tr><td>{name}</td><td colspan=7>build failed: {html.escape(r['error'])}</td></tr>")
            continue
        body.append(f"<tr><td>{name}</td><td>{r['cost']:.4g} {r['metric']}</td><td>{r['relative_cost']:.3f}</td>"
                    f"<td>{r['accuracy']:.4f}</td><td>{r['loss']:.4f}</td><td>{r['size_bytes'] / 1024:.1f}</td>"
                    f"<td>{r['macs']:,}</td><td>{'yes' if r.get('feasible') else 'no'}</td></tr>")
    return f"<table>{head}{''.join(body)}</table>"


def _choices(settings: dict[str, Any]) -> str:
    rows = [("precision", settings["precision"])]
    rows += [(f"prune group of {name}", f"{rate:.0%} of channels") for name, rate in sorted(settings["prune"].items())]
    rows += [(f"factorize {name}", f"{level:.0%} of its MACs") for name, level in sorted(settings["factorize"].items())]
    rows += [(f"keep float {name}", "yes") for name in settings["keep_float"]]
    rows += [("fine-tuning", "yes" if settings["finetune"] else "no")]
    return "<table>" + "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in rows) + "</table>"
