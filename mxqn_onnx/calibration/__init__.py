"""Calibration: what the layer inputs look like on real data.

In: the normalised FP32 model, the tensors to observe and the user's data (files, folders,
arrays or readers, turned into checked batches by :mod:`.data`). :mod:`.calibrate` streams the
batches through one onnxruntime session and feeds each observed tensor to the mergeable
observers of :mod:`.observers`. Out: a histogram per tensor (plus, for the low-bit steps, the
first samples of each layer input and per-channel means), and the batches kept for
verification when the data cannot be read twice.
"""
