"""The one family of errors a user can cause.

Every message says what went wrong *and* what to do about it; the CLI prints it as one
paragraph without a traceback and exits non-zero. Anything that is not an ``EdgecError``
is a bug in edgec.
"""

from __future__ import annotations


class EdgecError(Exception):
    """Base class: a problem with the user's input, options or environment."""

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message} {hint}")


class EdgecWarning(UserWarning):
    """Something a user should know that does not stop the build (e.g. random calibration)."""


class OptionError(EdgecError):
    """An option value is out of its range or not one of the allowed names."""


class ModelLoadError(EdgecError):
    """The file is missing, unreadable, not ONNX, truncated or refers outside itself."""


class ModelCheckError(EdgecError):
    """The ONNX checker or shape inference rejects the model."""


class DynamicShapeError(EdgecError):
    """An input has a dynamic dimension and no ``--input-shape`` pins it."""


class UnsupportedOpError(EdgecError):
    """An operator (or an operator in a particular configuration) cannot be lowered."""

    def __init__(
        self,
        op_type: str,
        node_name: str,
        *,
        target: str | None = None,
        reason: str = "",
        hint: str | None = None,
    ) -> None:
        self.op_type = op_type
        self.node_name = node_name
        self.target = target
        self.reason = reason
        where = f" for target '{target}'" if target else ""
        detail = f": {reason}" if reason else ""
        super().__init__(
            f"Operator {op_type} (node '{node_name}') cannot be lowered{where}{detail}.",
            hint=hint,
        )


class TargetError(EdgecError):
    """Unknown target name or a malformed target file."""


class InputDataError(EdgecError):
    """An ``--inputs``/``--calib`` file does not match the model's inputs."""


class QuantizationError(EdgecError):
    """int8 quantization cannot be done as asked (e.g. the model is already quantized)."""


class OutputError(EdgecError):
    """The output directory cannot be created or written."""


class VerificationError(EdgecError):
    """The artifact does not reproduce the source model within the tolerance."""

    exit_code = 3


class DeviceError(EdgecError):
    """A device entry is malformed, or profiling on a device failed for a reason outside edgec.

    ``reason`` says which, so callers and tests can tell them apart: ``config`` (an unknown
    or malformed device), ``not_set_up``, ``unreachable``, ``auth``, ``host_key``,
    ``runtime_missing``, ``timeout`` or ``failed``.
    """

    def __init__(self, message: str, *, reason: str = "config", hint: str | None = None) -> None:
        self.reason = reason
        super().__init__(message, hint=hint)


class ExecutorError(EdgecError):
    """The executor a search runs on (e.g. a Ray cluster) is missing or cannot be reached."""


class InternalError(EdgecError):
    """A pass or backend failed in a way no user input should cause: a bug in edgec."""

    exit_code = 70


class RecipeError(EdgecError):
    """A compression recipe or --prune/--factorize option is malformed or asks the impossible."""


class BudgetError(EdgecError):
    """``edgec optimize`` cannot deliver: no candidate met every budget within the accuracy
    bound, or the fp32 build every cost is relative to failed."""
