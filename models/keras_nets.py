"""The TensorFlow half of the zoo: a Keras CNN that reaches ONNX the way TensorFlow users'
models do — built and trained in tf_keras, exported with tf2onnx — so it has an NHWC input,
Transposes around its convs, PRelu, an explicit Pad and Clip (ReLU6)."""

from __future__ import annotations

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf2onnx  # noqa: E402
import tf_keras as keras  # noqa: E402

import digits as data  # noqa: E402
from tf2onnx_fixes import KEEP_TRANSPOSES, rewrite_keras_prelu, stable_names  # noqa: E402

EPOCHS = 30
BATCH = 64


def build(seed: int = 0) -> keras.Model:
    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    layers = keras.layers
    x = inputs = keras.Input((32, 32, 1), name="image")
    x = layers.Conv2D(16, 3, padding="same", use_bias=False)(x)
    x = layers.BatchNormalization(momentum=0.9)(x)
    x = layers.PReLU(shared_axes=[1, 2])(x)
    # tf2onnx merges a ZeroPadding2D into a following Conv2D; before a depthwise conv
    # (Keras MobileNet's downsampling pattern) it stays an ONNX Pad.
    x = layers.ZeroPadding2D(((0, 1), (0, 1)))(x)
    x = layers.DepthwiseConv2D(3, strides=2, padding="valid", use_bias=False)(x)
    x = layers.BatchNormalization(momentum=0.9)(x)
    x = layers.ReLU(6.0)(x)
    x = layers.Conv2D(32, 1, use_bias=False)(x)
    x = layers.BatchNormalization(momentum=0.9)(x)
    x = layers.ReLU(6.0)(x)
    x = layers.DepthwiseConv2D(3, padding="same", use_bias=False)(x)
    x = layers.BatchNormalization(momentum=0.9)(x)
    x = layers.ReLU(6.0)(x)
    x = layers.Conv2D(32, 1, use_bias=False)(x)
    x = layers.BatchNormalization(momentum=0.9)(x)
    x = layers.ReLU(6.0)(x)
    x = layers.ZeroPadding2D(1)(x)
    x = layers.Conv2D(48, 3, strides=2, padding="valid")(x)
    x = layers.PReLU(shared_axes=[1, 2])(x)
    x = layers.GlobalAveragePooling2D()(x)
    outputs = layers.Dense(10, name="logits")(x)
    return keras.Model(inputs, outputs, name="keras_cnn")


def train(digits: data.Digits, seed: int = 0) -> keras.Model:
    model = build(seed)
    x, y = data.nhwc(digits.train), digits.train.labels
    schedule = keras.optimizers.schedules.CosineDecay(5e-3, EPOCHS * -(-len(x) // BATCH))
    model.compile(optimizer=keras.optimizers.Adam(schedule),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    augmented = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=seed).batch(BATCH).map(_shift)
    model.fit(augmented, epochs=EPOCHS, verbose=0)
    return model


def _shift(images, labels):
    """Random ±2 pixel translations (seeded through the global seed)."""
    padded = tf.pad(images, [[0, 0], [2, 2], [2, 2], [0, 0]], constant_values=-1.0)
    offset = tf.random.uniform([2], 0, 5, dtype=tf.int32)
    return padded[:, offset[0]:offset[0] + 32, offset[1]:offset[1] + 32, :], labels


def export(model: keras.Model) -> bytes:
    spec = [tf.TensorSpec([1, 32, 32, 1], tf.float32, name="image")]
    # KEEP_TRANSPOSES: all default tf2onnx optimizers except the transpose optimizer (which
    # would leave no Transpose at all), with a deterministic duplicate merge.
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=17,
                                          custom_rewriter=[rewrite_keras_prelu], optimizers=KEEP_TRANSPOSES)
    _rename_output(proto, "logits")
    proto.producer_version = tf2onnx.__version__  # tf2onnx appends its git hash, "None" in wheels
    stable_names(proto)  # tf2onnx's generated names differ from run to run
    check_graph(proto)
    return proto.SerializeToString()


def check_graph(proto: onnx.ModelProto) -> None:
    """The export must show the TensorFlow-origin patterns this model is in the zoo for."""
    ops = {node.op_type for node in proto.graph.node}
    missing = {"Transpose", "Pad", "PRelu", "Clip"} - ops
    assert not missing, f"keras_cnn export lacks {sorted(missing)}"
    shape = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert proto.graph.input[0].name == "image" and shape == [1, 32, 32, 1], f"input is not NHWC: {shape}"


def _rename_output(proto: onnx.ModelProto, name: str) -> None:
    old = proto.graph.output[0].name
    for node in proto.graph.node:
        node.output[:] = [name if o == old else o for o in node.output]
        node.input[:] = [name if i == old else i for i in node.input]
    proto.graph.output[0].name = name


def keras_logits(model: keras.Model, images: np.ndarray) -> np.ndarray:
    return model.predict(images, verbose=0)
