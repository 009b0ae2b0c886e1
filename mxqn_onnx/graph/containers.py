"""Which integer container holds a quantized tensor, given its bit width and the opset.

ONNX has no 5/6/7-bit types: such codes sit in int8 containers (the file does not shrink
below one byte per weight). INT4/UINT4 tensors exist from opset 21 (IR 10), where ``Cast``,
``QuantizeLinear`` and ``DequantizeLinear`` accept them and initializers are packed two
codes per byte; ``QuantizeLinear``/``DequantizeLinear`` take 16-bit types from opset 21 too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto

#: First default-domain opset with INT4/UINT4 and 16-bit QuantizeLinear/DequantizeLinear.
INT4_OPSET = 21
QDQ16_OPSET = 21


@dataclass(frozen=True)
class Container:
    """An integer storage type: its name, ONNX enum, width in bits and numpy placeholder."""

    name: str
    onnx_type: int
    width: int
    signed: bool

    @property
    def placeholder(self) -> type:
        """numpy dtype used while the graph is edited (4-bit types are retyped on export)."""
        return {
            "int4": np.int8, "uint4": np.uint8, "int8": np.int8, "uint8": np.uint8,
            "int16": np.int16, "uint16": np.uint16, "int32": np.int32,
        }[self.name]

    @property
    def packed(self) -> bool:
        return self.width == 4


_TYPES = {
    (4, True): Container("int4", TensorProto.INT4, 4, True),
    (4, False): Container("uint4", TensorProto.UINT4, 4, False),
    (8, True): Container("int8", TensorProto.INT8, 8, True),
    (8, False): Container("uint8", TensorProto.UINT8, 8, False),
    (16, True): Container("int16", TensorProto.INT16, 16, True),
    (16, False): Container("uint16", TensorProto.UINT16, 16, False),
    (32, True): Container("int32", TensorProto.INT32, 32, True),
}


def container_for(bits: int, signed: bool, opset: int) -> Container:
    """Smallest container for ``bits``-bit codes available at ``opset``."""
    if bits <= 4 and opset >= INT4_OPSET:
        return _TYPES[(4, signed)]
    if bits <= 8:
        return _TYPES[(8, signed)]
    if bits <= 16:
        return _TYPES[(16, signed)]
    return _TYPES[(32, True)]


def weight_container(bits: int, opset: int) -> str:
    """Name of the container a signed ``bits``-bit weight is stored in at ``opset``."""
    return container_for(bits, True, opset).name


def qdq_supports(bits: int, opset: int) -> bool:
    """Whether QuantizeLinear/DequantizeLinear at ``opset`` can carry ``bits``-bit codes."""
    return bits <= 8 or (bits <= 16 and opset >= QDQ16_OPSET)


def retype_initializers(model: onnx.ModelProto, retype: Dict[str, Container]) -> None:
    """Replace placeholder initializers by packed 4-bit tensors (two codes per byte)."""
    if not retype:
        return
    for i, t in enumerate(model.graph.initializer):
        c = retype.get(t.name)
        if c is None or not c.packed:
            continue
        values = onnx.numpy_helper.to_array(t)
        np_type = ml_dtypes.int4 if c.signed else ml_dtypes.uint4
        model.graph.initializer[i].CopyFrom(onnx.numpy_helper.from_array(values.astype(np_type), t.name))
    # value_info recorded with the placeholder type would contradict the new type
    names = set(retype)
    keep = [vi for vi in model.graph.value_info if vi.name not in names]
    del model.graph.value_info[:]
    model.graph.value_info.extend(keep)
