"""Weight clustering with tensorflow-model-optimization: every trainable Conv, depthwise Conv
and Dense kernel keeps only N distinct values (k-means++ centroids, trained with the rest),
so the file deflates far better. TFMOT's whole-model wrapper refuses edgec's Keras models
(their ``Identity`` output layers), so layers are wrapped one by one through ``clone_model``.

TFMOT's registry leaves depthwise kernels unclustered (it lost too much on ImageNet
MobileNets). On the zoo's MobileNets those kernels were a third of what stayed incompressible
(MobileNetV2 deflated only 2.71x smaller with them left out, 16 clusters), so they are clustered too,
through a ``ClusterableLayer`` that holds the depthwise layer's kernel: that is the
extension point TFMOT gives custom layers.

The wrappers' own ``call`` (indices of the nearest centroids, then a gather) runs once per
step outside ``tf.vectorized_map``, which put the whole model in a per-sample loop; the
plain model then runs vectorized on the clustered kernels the wrappers set on its layers."""

from __future__ import annotations

import tensorflow as tf
import tf_keras as keras
from tensorflow_model_optimization.clustering import keras as clustering

from edgec.train.loop import WeightConstraint

DEPTHWISE_LAYERS = (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)
CLUSTERED_LAYERS = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Dense, *DEPTHWISE_LAYERS)
INIT = clustering.CentroidInitialization.KMEANS_PLUS_PLUS


class DepthwiseKernel(keras.layers.Layer, clustering.ClusterableLayer):
    """A depthwise layer's kernel as a layer TFMOT clusters; the clustered tensor goes back
    onto the depthwise layer before every forward pass (``attach``)."""

    def __init__(self, layer: keras.layers.Layer):
        super().__init__(name=f"{layer.name}_kernel")
        self.owner = layer
        self.depthwise_kernel = layer.depthwise_kernel
        self.built = True

    def get_clusterable_weights(self) -> list[tuple[str, tf.Variable]]:
        return [("depthwise_kernel", self.depthwise_kernel)]

    def attach(self) -> None:
        """The owner computes with the clustered kernel (set past Keras's attribute tracking,
        so the owner's ``weights`` keep their variable and order)."""
        object.__setattr__(self.owner, "depthwise_kernel", self.depthwise_kernel)

    def strip(self, kernel: tf.Variable) -> None:
        """The owner's own variable holds the clustered values, and the owner uses it again."""
        kernel.assign(self.depthwise_kernel)
        object.__setattr__(self.owner, "depthwise_kernel", kernel)


class Clustering(WeightConstraint):
    """``model``'s trainable Conv, depthwise Conv and Dense layers clustered to ``clusters`` values each."""

    def __init__(self, model: keras.Model, clusters: int):
        self.wrappers: list = []
        self.depthwise: list[tuple[object, tf.Variable]] = []  # wrapped kernel holders and the kernels they stand for

        def wrap(layer: keras.layers.Layer) -> keras.layers.Layer:
            if not (isinstance(layer, CLUSTERED_LAYERS) and layer.trainable):
                return layer
            if isinstance(layer, DEPTHWISE_LAYERS):
                self._wrap_depthwise(layer, clusters)
                return layer
            self.wrappers.append(clustering.cluster_weights(layer, number_of_clusters=clusters, cluster_centroids_init=INIT))
            return self.wrappers[-1]

        # The layers themselves go into the copy (wrapped or not), with their weights.
        self.clustered = keras.models.clone_model(model, clone_function=wrap)

    def _wrap_depthwise(self, layer: keras.layers.Layer, clusters: int) -> None:
        wrapper = clustering.cluster_weights(DepthwiseKernel(layer), number_of_clusters=clusters, cluster_centroids_init=INIT)
        wrapper.build(None)
        self.depthwise.append((wrapper, layer.depthwise_kernel))

    def trainable(self, model: keras.Model) -> list[tf.Variable]:
        """Centroids and the unclustered weights they are drawn from (the depthwise kernels
        through their holders, not twice)."""
        holders = [v for wrapper, _ in self.depthwise for v in wrapper.trainable_variables]
        held = {id(kernel) for _, kernel in self.depthwise}
        return [v for v in self.clustered.trainable_variables if id(v) not in held] + holders

    def before_forward(self) -> None:
        for wrapper in self.wrappers:
            wrapper.update_clustered_weights_associations()
        for wrapper, _ in self.depthwise:
            wrapper.update_clustered_weights_associations()
            wrapper.layer.attach()

    def stripped(self) -> keras.Model:
        """The clustered model as plain layers (same names, kernels holding the centroids)."""
        for wrapper, kernel in self.depthwise:
            wrapper.update_clustered_weights_associations()
            wrapper.layer.strip(kernel)
        return clustering.strip_clustering(self.clustered)
