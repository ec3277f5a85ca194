"""Which layers a compression pass may touch: by op type and by node-name pattern.

Shared by every pass that lets users say "these layers, not those", so the rules (fnmatch
patterns, exclusion wins, a pattern matching nothing is a mistake worth reporting) read the
same everywhere.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Iterable, Sequence

import onnx_ir as ir

from edgec.errors import RecipeError


def _as_tuple(value: str | Sequence[str]) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


@dataclasses.dataclass(frozen=True)
class LayerSelection:
    """``op_types``: only these op types (all candidates when empty). ``include``: only
    nodes whose name matches one of these fnmatch patterns (all when empty). ``exclude``:
    never nodes matching these; exclusion wins over inclusion."""

    op_types: Sequence[str] = ()
    include: Sequence[str] = ()
    exclude: Sequence[str] = ()

    def __post_init__(self) -> None:
        for field in ("op_types", "include", "exclude"):
            object.__setattr__(self, field, _as_tuple(getattr(self, field)))

    def wants(self, node: ir.Node) -> bool:
        name = node.name or ""
        return (
            (not self.op_types or node.op_type in self.op_types)
            and (not self.include or any(fnmatch.fnmatchcase(name, p) for p in self.include))
            and not any(fnmatch.fnmatchcase(name, p) for p in self.exclude)
        )


def select_layers(candidates: Iterable[ir.Node], selection: LayerSelection, step: str) -> list[ir.Node]:
    """The candidates ``selection`` wants, in order.

    Every include/exclude pattern must match at least one candidate: a typo would otherwise
    silently compress everything (or nothing). The message lists some candidate names.
    """
    candidates = list(candidates)
    names = [node.name or "" for node in candidates]
    for option in ("include", "exclude"):
        for pattern in getattr(selection, option):
            if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
                raise RecipeError(
                    f"Step '{step}': {option} pattern '{pattern}' matches none of the {len(names)} layers it can change.",
                    hint=f"Layer names look like: {', '.join(names[:6]) or '(none)'} (see `edgec inspect`).",
                )
    unknown = sorted(set(selection.op_types) - {node.op_type for node in candidates})
    if unknown:
        raise RecipeError(f"Step '{step}': no layer it can change has op type {', '.join(unknown)}.",
                          hint=f"Op types present: {', '.join(sorted({n.op_type for n in candidates})) or '(none)'}.")
    chosen = [node for node in candidates if selection.wants(node)]
    if not chosen:
        raise RecipeError(f"Step '{step}': the layer selection leaves nothing to change.",
                          hint="Loosen include/exclude/op_types.")
    return chosen
