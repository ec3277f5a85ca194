"""The stages of a build, in order, each in its own module; ``edgec build`` (edgec.build) runs
them in sequence and ``edgec optimize`` evaluates its candidates through that same build.

- ``source``: load, canonicalize, run the user's file once in ONNX Runtime as the reference
- ``data``: calibration samples, the share held back to verify on, verification inputs
- ``compress``: the recipe's passes (pruning, factorization, fine-tuning) and what they cost
- ``int8``: accuracy recovery, quantization, the precision search's float set; ``speed``: int8 vs fp32
- ``verify``: the artifact against its reference on the same inputs
- ``profile``: the artifact measured on a device; ``report``: report.json's record of the build
"""
