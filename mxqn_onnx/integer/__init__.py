"""Integer-only execution of mxqn-format models: the reference for hardware.

:mod:`.kernels` holds the arithmetic per operation (fixed-point and log codes, int64
accumulators, round-half-even shifts, the integer convolution); :mod:`.executor` walks a
converted model, runs its quantized layers with those kernels and everything else in float
through onnxruntime, and checks the result against onnxruntime. In: a converted model and
input data; out: the integer run and how far it is from onnxruntime (``mxqn-onnx simulate``).
"""
