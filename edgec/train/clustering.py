"""Weight clustering with tensorflow-model-optimization: every trainable Conv (not depthwise) and Dense kernel
keeps only N distinct values (k-means++ centroids, trained with the rest), so the file
deflates far better. TFMOT's whole-model wrapper refuses edgec's Keras models (their
``Identity`` output layers), so layers are wrapped one by one through ``clone_model``."""

from __future__ import annotations

import tf_keras as keras

# Depthwise kernels are few values already, and TFMOT's wrapper left them unclustered here.
CLUSTERED_LAYERS = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Dense)


def clustered(model: keras.Model, clusters: int) -> keras.Model:
    """A copy of ``model`` whose trainable Conv/Dense layers are clustered to ``clusters`` values."""
    from tensorflow_model_optimization.clustering import keras as clustering

    def wrap(layer: keras.layers.Layer) -> keras.layers.Layer:
        if isinstance(layer, CLUSTERED_LAYERS) and layer.trainable:
            init = clustering.CentroidInitialization.KMEANS_PLUS_PLUS
            return clustering.cluster_weights(layer, number_of_clusters=clusters, cluster_centroids_init=init)
        return layer

    # The layers themselves go into the copy (wrapped or not), with their weights.
    return keras.models.clone_model(model, clone_function=wrap)


def stripped(model: keras.Model) -> keras.Model:
    """The clustered model as plain layers (same names, kernels holding the centroids)."""
    from tensorflow_model_optimization.clustering import keras as clustering

    return clustering.strip_clustering(model)
