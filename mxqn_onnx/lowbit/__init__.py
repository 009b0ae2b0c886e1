"""The low-bit techniques: what wins back accuracy at 4-6 bits without retraining.

Each works on the graph or on one layer's numbers and is called from the stage that owns it:
:mod:`.align` rescales channels of the normalised graph before calibration (cross-layer
equalization, power-of-two alignment) keeping the FP32 function; :mod:`.correction` corrects
biases for the mean output shift of quantization (means from data or from BatchNorm
priors); :mod:`.rounding` chooses weight codes for the layer's output error (GPTQ);
:mod:`.unfold` writes a layer as a matrix product (weight rows, input patches) for the other
two and for the output objective. In: graphs, layers, calibration samples; out: rescaled
graphs, corrected biases and weight codes that the per-layer choice keeps where they measure
better.
"""
