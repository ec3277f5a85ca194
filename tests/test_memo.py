"""Results remembered by content (edgec.memo) and the calibration ranges a build reuses."""

from __future__ import annotations

import numpy as np
from test_quantize import _calibration, outlier_model

from edgec.memo import Recent, fingerprint
from edgec.passes.quantize import QuantScheme, calibrate


def test_fingerprint_sees_content_dtype_and_shape_not_identity_or_key_order():
    a = np.arange(6, dtype=np.float32)
    assert fingerprint(b"m", [{"x": a, "y": 1}]) == fingerprint(b"m", [{"y": 1, "x": a.copy()}])
    assert fingerprint(a) != fingerprint(a.astype(np.float64))
    assert fingerprint(a) != fingerprint(a.reshape(2, 3))
    assert fingerprint(a) != fingerprint(a + 1)
    assert fingerprint("ab", "c") != fingerprint("a", "bc")


def test_recent_computes_each_key_once_and_forgets_the_least_recently_used():
    calls = []
    recent = Recent(2)
    compute = lambda key: lambda: calls.append(key) or key.upper()  # noqa: E731
    assert [recent.get(k, compute(k)) for k in ("a", "b", "a", "c", "a", "b")] == ["A", "B", "A", "C", "A", "B"]
    assert calls == ["a", "b", "c", "b"]  # "b" was the least recently used when "c" came


def test_calibration_is_reused_but_each_caller_gets_its_own_ranges():
    proto, scheme = outlier_model(), QuantScheme()
    first = calibrate(proto, _calibration().batches, scheme)
    name = next(iter(first.data))
    first.data[name] = None  # ORT's quantizer edits the ranges it is given
    again = calibrate(proto, _calibration().batches, scheme)
    assert again.data[name] is not None
    assert set(again.data) == set(first.data)
