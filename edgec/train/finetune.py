"""The ``finetune`` step: the pass that trains a model and writes its weights back (see ``edgec.train``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import onnx
import onnx_ir as ir

from edgec.errors import EdgecError
from edgec.lower.tflite import KerasLowering, prepare, to_keras
from edgec.model import to_bytes
from edgec.passes.layout import inverse
from edgec.passes.pipeline import PassOutcome
from edgec.runtime.ort import OrtRunner
from edgec.train.clustering import Clustering
from edgec.train.data import Head, Split, classifier_output, heads, training_data
from edgec.train.features import feature_targets, shared_features, with_features
from edgec.train.gates import ChannelGates
from edgec.train import EpochObserver, FinetuneOptions, TrainingContext
from edgec.train.loop import LoopSettings, Trainer
from edgec.train.pruning import GradualPruning
from edgec.train.trace import coded_copy, layer_weights, trace
from edgec.verify import run_all


class Finetune(ir.passes.InPlacePass):
    """Train the model's weights toward the source model's outputs (and labels); see the module."""

    name = "finetune"

    def __init__(self, options: FinetuneOptions, context: TrainingContext):
        self.options, self.context = options, context

    def call(self, model: ir.Model) -> PassOutcome:
        o = self.options
        seed = self.context.seed if o.seed is None else o.seed
        before_runner = OrtRunner(to_bytes(model), threads=1, optimization="disabled")
        samples = self.context.read(o.data, before_runner.inputs)
        source = self._source_lowering() if o.features else None  # first: every lowering clears the Keras session
        coded, offsets = coded_copy(model)
        codes = layer_weights(to_keras(prepare(coded)[0]).model)
        prepared = prepare(model.clone())[0]
        lowering = to_keras(prepared)
        weights = trace(model, lowering.model, codes, offsets)
        frozen_nodes = self._freeze(lowering, weights.frozen)
        teacher = OrtRunner(self.context.source, threads=1, optimization="disabled")
        train, validation = training_data(samples, teacher, lowering.io, o.validation, seed, o.mix, o.augment)
        found = heads(model, lowering.io["outputs"])
        classifier = None if samples.labels is None else classifier_output(model, lowering.io["outputs"], train.labels)
        features = shared_features(source[0], prepared) if source else []
        if features:
            taught, (held,) = feature_targets(source[1], lowering, features, train.inputs, [validation.inputs])
            train, validation = train.with_targets(taught), validation.with_targets(held)
            found = [*found, *(Head(name, "feature") for name in features)]
        settings = LoopSettings(o.epochs, o.lr, o.batch_size, o.budget_s, o.patience, o.temperature, o.distill_weight, seed,
                                o.schedule, o.warmup, o.features)
        steps = o.epochs * -(-len(train) // o.batch_size)
        pruning = GradualPruning(lowering.model, o.sparsity, steps) if o.sparsity else None
        clustering = Clustering(lowering.model, o.clusters) if o.clusters else None
        gates = ChannelGates(model, lowering, o.gates, steps) if o.gates else None
        trained = with_features(lowering, features) if features else lowering.model
        qat = self._quantization_aware(trained, lowering, model, prepared, train) if o.qat else None
        trainer = Trainer(qat.model if qat else trained, found, classifier, train, settings, pruning or clustering or gates)
        before = trainer.metric(validation, _onnx_predict(before_runner, lowering.io))
        observer = _labeled(self.context.on_epoch, "channel gates") if gates is not None else self.context.on_epoch
        history = trainer.fit(train, validation, observer)
        if qat is not None:
            qat.strip()
        if gates is not None:
            gates.fold()
        changed = weights.write_back(model, clustering.stripped() if clustering else lowering.model)
        after_runner = OrtRunner(to_bytes(model), threads=1, optimization="disabled")
        after = trainer.metric(validation, _onnx_predict(after_runner, lowering.io))
        details = {
            "data": samples.source, "labeled": classifier is not None, "samples": len(train), "validation_samples": len(validation),
            "heads": [h.to_dict() for h in found if h.kind != "feature"], "features": features, "metric": "top1" if classifier is not None else "min_output_cosine",
            "options": {k: v for k, v in dataclasses.asdict(o).items() if k != "data"} | {"seed": seed},
            "epochs": len(history.losses), "best_epoch": history.best_epoch, "stopped": history.stopped,
            "losses": history.losses, "validation_losses": history.validation_losses, "validation_metric": history.metrics,
            "before": round(before, 6), "after": round(after, 6),
            "trained_layers": sum(1 for layer in lowering.model.layers if layer.weights and layer.trainable),
            "frozen_nodes": frozen_nodes, "initializers_updated": len(changed),
        }
        if pruning is not None:
            details["sparsity"] = round(pruning.sparsity(), 6)
        if qat is not None:
            details["qat"] = qat.report()
        if gates is not None:
            details["gates"] = gates.report()
        if frozen_nodes:
            details["note"] = (f"Fine-tuning left {len(frozen_nodes)} layer(s) untrained, whose Keras weights are computed from "
                               f"their ONNX initializers rather than copied: {', '.join(frozen_nodes[:5])}"
                               f"{'...' if len(frozen_nodes) > 5 else ''}.")
        return PassOutcome(model, bool(changed) and (history.best_epoch > 0 or bool(o.clusters or o.sparsity or o.qat or o.gates)), details)

    def _quantization_aware(self, trained, lowering: KerasLowering, model: ir.Model, prepared: ir.Model, train: Split):
        """``trained`` wrapped for quantization-aware training toward the build's int8 scheme."""
        if self.context.weight_qmax is None:
            raise EdgecError("Quantization-aware training (qat = true) trains for an int8 build, and this build is not one.",
                             hint="Build with --precision int8, or drop qat from the finetune step.")
        from edgec.train.qat import QuantizationAware, quantized_values  # TFMOT's quantization API: only when asked for

        names = quantized_values(prepared, {v.name for node in model.graph for v in node.outputs})
        return QuantizationAware(trained, lowering, names, self.context.weight_qmax, train.inputs)

    def _source_lowering(self) -> tuple[ir.Model, KerasLowering]:
        """The source model prepared for and lowered to Keras, to take its features from."""
        prepared = prepare(ir.serde.deserialize_model(onnx.load_from_string(self.context.source)))[0]
        return prepared, to_keras(prepared)

    @staticmethod
    def _freeze(lowering, frozen_layers: list[str]) -> list[str]:
        """Freeze the layers whose weights cannot go back; the ONNX nodes they came from."""
        if not any(layer.weights for layer in lowering.model.layers):
            raise EdgecError("The model has no layer with weights to fine-tune.", hint="Build without --finetune.")
        for name in frozen_layers:
            lowering.model.get_layer(name).trainable = False
        if all(not layer.trainable for layer in lowering.model.layers if layer.weights):
            raise EdgecError(f"No layer of the model can be fine-tuned: {', '.join(frozen_layers[:5])} compute their weights "
                             "in ways edgec cannot write back to ONNX.", hint="Build without --finetune.")
        return sorted(node for node, layers in lowering.layers.items() if set(layers) & set(frozen_layers))


def _labeled(observer: EpochObserver | None, training: str) -> EpochObserver | None:
    """``observer`` told which training an epoch belongs to (the progress shows it)."""
    if observer is None:
        return None
    return lambda info: observer({**info, "training": training})


def _onnx_predict(runner: OrtRunner, io: dict) -> Callable[[Split], list]:
    """Outputs of an ONNX model in ORT, in the Keras layout ``Split`` targets use."""

    def predict(split: Split) -> list:
        batches = [{e["name"]: split.inputs[k][i].transpose(inverse(e["perm"])) for k, e in enumerate(io["inputs"])}
                   for i in range(len(split))]
        got = run_all(runner, batches)
        return [got[e["name"]].transpose(0, *[p + 1 for p in e["perm"]]) for e in io["outputs"]]

    return predict


def finetune_pass(options: Mapping[str, Any], context: TrainingContext) -> Finetune:
    """The recipe family's factory (see ``edgec.recipe``)."""
    from edgec.recipe import options_from

    return Finetune(options_from(FinetuneOptions, options, "finetune"), context)
