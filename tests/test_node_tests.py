"""``make bench``'s node_tests section: every one of ONNX's operator tests (1,615 in the
pinned onnx wheel) builds for tflite-x86 and ort-x86, in fp32 and in int8 calibrated on its
inputs, without a crash, a timeout or an internal error (about a minute per sweep). Among
them are tests that once killed edgec or ended in an internal error: an integer Div and a
uint8 Equal (on tflite-x86), a Gather with negative indices as data, a Split of an input
without elements, a Shape past its end; in int8, causal attention masks of -inf, opset-23
models, scalar inputs and integer divisions timed by the speed check."""

from __future__ import annotations

import pytest

from edgec.bench.node_tests import BAD_OUTCOMES, node_test_dirs, summary, sweep

# name → outcome on (tflite-x86, ort-x86)
CHOSEN = {
    "test_relu": ("matches", "matches"),
    "test_div_uint8": ("matches", "matches"),
    "test_equal_uint8": ("matches", "matches"),
    "test_equal_string": ("skipped", "skipped"),
    "test_gather_negative_indices": ("matches", "matches"),
    "test_split_zero_size_splits_opset18": ("matches", "matches"),
    "test_col2im": ("refused", "matches"),  # no TFLite rule
    "test_conv_with_strides_padding": ("refused", "matches"),  # TFLite needs a constant weight
    "test_shape_start_greater_than_end": ("refused", "refused"),  # opset 24: ONNX Runtime 1.23 refuses it
    # TFLite rules added from the sweep's refusals
    "test_depthtospace_crd_mode_example": ("matches", "matches"),
    "test_gather_elements_negative_indices": ("matches", "matches"),
    "test_scatternd": ("matches", "matches"),
    "test_scatter_elements_with_negative_indices": ("matches", "matches"),
    "test_rms_normalization_4d_axis1": ("matches", "matches"),
    "test_mish": ("matches", "matches"),
    "test_hardmax_one_hot": ("matches", "matches"),
    "test_lrn": ("matches", "matches"),
    "test_acosh": ("matches", "matches"),
    "test_reversesequence_batch": ("matches", "matches"),
    "test_eyelike_with_dtype": ("refused", "matches"),  # a constant output: nothing for TFLite to compute
    "test_attention_4d_attn_mask_bool": ("matches", "matches"),
    "test_rotary_embedding_interleaved": ("matches", "matches"),
    "test_gridsample_bilinear": ("matches", "matches"),
    "test_gridsample_nearest": ("matches", "matches"),
    "test_argmax_negative_axis_keepdims_example_select_last_index": ("matches", "matches"),
    "test_dropout_default_mask": ("matches", "matches"),  # a graph output, so onnxsim leaves it
}
TARGETS = ("tflite-x86", "ort-x86")


@pytest.fixture(scope="module", params=[(t, p) for t in TARGETS for p in ("fp32", "int8")], ids=lambda p: "-".join(p))
def swept(request, tmp_path_factory):
    target, precision = request.param
    work = tmp_path_factory.mktemp(f"{target}-{precision}")
    return target, precision, sweep(target, node_test_dirs(), work, precision=precision), work


def test_no_node_test_crashes_times_out_or_ends_in_an_internal_error(swept):
    target, precision, rows, work = swept
    found = summary(rows)
    assert found["tests"] == len(node_test_dirs()) > 1000
    assert {o: found[o] for o in BAD_OUTCOMES if o in found} == {}, (target, precision)
    assert found["outcomes"]["matches"] > 400 and found["largest_relative_deviation"] <= 1e-3
    assert list(work.iterdir()) == [], "each test's build folder is removed after it"


def test_chosen_node_tests_end_as_they_should(swept):
    target, precision, rows, _ = swept
    if precision != "fp32":
        pytest.skip("the outcomes chosen are fp32's")
    got = {r["test"]: r["outcome"] for r in rows if r["test"] in CHOSEN}
    assert got == {name: outcomes[TARGETS.index(target)] for name, outcomes in CHOSEN.items()}
