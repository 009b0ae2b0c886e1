"""What the user sees after (or instead of) a conversion.

:mod:`.measure` runs the FP32 and the quantized model side by side (output SQNR, top-1,
agreement); :mod:`.tables` prints the decisions and measurements of a report dict;
:mod:`.inspection` reads files (the layers a model would quantize, an mxqn model's stored
decisions, a JSON report); :mod:`.plots` draws the PNG pictures (matplotlib imported only
when plotting). In: models, data and the report dict; out: numbers, tables and pictures,
never a change to the model.
"""
