"""Choosing the quantizers.

:mod:`.quantizers` is all the quantizer math (fixed point and log, SQNR on exact data and on
histograms), pure numpy, shared by the analysis, the integer executor and the tests.
:mod:`.choose` takes the layers and their calibration statistics and gives one decision per
layer: weight bits and fractional length(s), the activation quantizer (fixed or log), the
bias fractional length; :mod:`.objective` optionally rescores activation candidates at the
outputs of the layers reading them. Out: the decisions the graph rewrite turns into a model.
"""
