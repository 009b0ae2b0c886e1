"""The ONNX graph, at both ends of the pipeline.

In: a model file or ``onnx.ModelProto``. :mod:`.loading` reads it, refuses what cannot be
converted and normalises it (constants and BatchNorm folded, nodes named) into an
onnx-graphsurgeon graph; :mod:`.layers` finds the Conv/ConvTranspose/Gemm/MatMul layers with a
constant weight and says why the others stay float. Out, after the quantizers are chosen:
:mod:`.rewrite` turns that graph plus the per-layer decisions into the quantized model, with
weights in the integer containers of :mod:`.containers`, activation quantizers as the ONNX
functions of :mod:`.functions` (``--format mxqn``) or as QuantizeLinear/DequantizeLinear pairs
(:mod:`.qdq`, ``--format qdq``), and the decisions as metadata.
"""
