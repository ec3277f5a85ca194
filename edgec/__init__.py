"""edgec: compile ONNX models into verified TFLite and ONNX Runtime artifacts for edge devices."""

import os

# TensorFlow reads these once, at its first import: edgec builds Keras 2 (tf_keras) models,
# and TensorFlow's C++ chatter would bury edgec's own messages.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

__version__ = "0.1.0"
