"""Weight clustering with tensorflow-model-optimization: every trainable Conv (not depthwise)
and Dense kernel keeps only N distinct values (k-means++ centroids, trained with the rest),
so the file deflates far better. TFMOT's whole-model wrapper refuses edgec's Keras models
(their ``Identity`` output layers), so layers are wrapped one by one through ``clone_model``.

The wrappers' own ``call`` (indices of the nearest centroids, then a gather) runs once per
step outside ``tf.vectorized_map``, which put the whole model in a per-sample loop; the
plain model then runs vectorized on the clustered kernels the wrappers set on its layers."""

from __future__ import annotations

import tensorflow as tf
import tf_keras as keras

from edgec.train.loop import WeightConstraint

# Depthwise kernels are few values already, and TFMOT's wrapper left them unclustered here.
CLUSTERED_LAYERS = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Dense)


class Clustering(WeightConstraint):
    """``model``'s trainable Conv/Dense layers clustered to ``clusters`` values each."""

    def __init__(self, model: keras.Model, clusters: int):
        from tensorflow_model_optimization.clustering import keras as clustering

        self.wrappers: list = []

        def wrap(layer: keras.layers.Layer) -> keras.layers.Layer:
            if not (isinstance(layer, CLUSTERED_LAYERS) and layer.trainable):
                return layer
            init = clustering.CentroidInitialization.KMEANS_PLUS_PLUS
            self.wrappers.append(clustering.cluster_weights(layer, number_of_clusters=clusters, cluster_centroids_init=init))
            return self.wrappers[-1]

        # The layers themselves go into the copy (wrapped or not), with their weights.
        self.clustered = keras.models.clone_model(model, clone_function=wrap)

    def trainable(self, model: keras.Model) -> list[tf.Variable]:
        return self.clustered.trainable_variables  # centroids and the unclustered weights they are drawn from

    def before_forward(self) -> None:
        for wrapper in self.wrappers:
            wrapper.update_clustered_weights_associations()

    def stripped(self) -> keras.Model:
        """The clustered model as plain layers (same names, kernels holding the centroids)."""
        from tensorflow_model_optimization.clustering import keras as clustering

        return clustering.strip_clustering(self.clustered)
