"""Op rules for the TFLite lowering, one module per family; importing registers them."""

from edgec.lower.tflite.ops import activation, conv, elementwise, linear, normalization, recurrent, resize, tensor

__all__ = ["activation", "conv", "elementwise", "linear", "normalization", "recurrent", "resize", "tensor"]
