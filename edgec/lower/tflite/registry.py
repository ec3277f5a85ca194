"""The table of op rules: ``(domain, op_type)`` → a function that builds Keras for one node.

A rule's signature is the op's spec: ONNX inputs are positional parameters (a Keras tensor,
a numpy array for compile-time constants, or None for an omitted optional input) and ONNX
attributes are keyword parameters with the spec's defaults::

    @rule("Gemm")
    def gemm(ctx, a, b, c=None, *, alpha=1.0, beta=1.0, transA=0, transB=0): ...

An attribute a rule does not declare makes the node unsupported (with its name in the
message) instead of being silently ignored. Adding an op is adding a rule; the list of
supported ops is read off this table, never kept by hand.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

RuleFn = Callable[..., Any]
RULES: dict[tuple[str, str], RuleFn] = {}


def rule(*op_types: str, domain: str = "") -> Callable[[RuleFn], RuleFn]:
    def register(fn: RuleFn) -> RuleFn:
        for op_type in op_types:
            key = (domain, op_type)
            if key in RULES:
                raise RuntimeError(f"two TFLite rules for {domain}::{op_type}")
            RULES[key] = fn
        return fn

    return register


def lookup(domain: str, op_type: str) -> RuleFn | None:
    return RULES.get(("" if domain == "ai.onnx" else domain, op_type))


def unexpected_arguments(fn: RuleFn, n_inputs: int, attributes: dict[str, Any]) -> str | None:
    """Why the node's inputs/attributes do not fit the rule's signature, or None if they do."""
    try:
        inspect.signature(fn).bind(None, *([None] * n_inputs), **attributes)
    except TypeError as exc:
        return str(exc)
    return None


def supported_ops() -> list[str]:
    return sorted(f"{d}::{op}" if d else op for d, op in RULES)
