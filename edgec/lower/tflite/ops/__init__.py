"""Op rules for the TFLite lowering, one module per family; importing registers them."""

from edgec.lower.tflite.ops import activation, attention, conv, elementwise, linear, normalization, recurrent, resize, tensor

__all__ = ["activation", "attention", "conv", "elementwise", "linear", "normalization", "recurrent", "resize", "tensor"]
