"""Mixed precision: a bit width per layer instead of one for the whole model.

In: the layers, their calibration histograms, the FP32 model and a goal (a target output
SQNR, average-bit or size budgets, or a maximum accuracy drop). :mod:`.sensitivity` measures
how much of each tensor's quantization noise reaches the output; :mod:`.allocate` solves the
allocation on the additive noise model (pure numpy); :mod:`.search` drives it: builds,
measures and refines candidate models through callbacks from the API. Out: the widths per
layer, the measured comparison of the chosen model, and a record for the report.
"""
