"""Minimal reproduction: OpenVINO's int8 convolution saturates int16 pair sums (docs/OPENVINO.md).

One layer, x -> QuantizeLinear -> DequantizeLinear -> Conv(DequantizeLinear(int8 W)) -> y, with
power-of-two scales. onnxruntime without graph optimizations computes it exactly in float (the
reference); the same file runs fused in onnxruntime and, int8, in OpenVINO with an f32
precision hint. Run: python docs/repro_openvino_int16_pairs.py
"""
import numpy as np
import onnxruntime as ort
import openvino as ov
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

rng = np.random.default_rng(0)
def model(act_signed, wmax, cin=3, cout=16, zp=128):
    w = rng.integers(-wmax, wmax + 1, size=(cout, cin, 3, 3)).astype(np.int8)
    azp = np.array(0 if act_signed else zp, np.int8 if act_signed else np.uint8)
    inits = [nh.from_array(np.array(2.0 ** -5, np.float32), 'xs'), nh.from_array(azp, 'xz'),
             nh.from_array(w, 'wq'), nh.from_array(np.full(cout, 2.0 ** -8, np.float32), 'ws'),
             nh.from_array(np.zeros(cout, np.int8), 'wz')]
    nodes = [h.make_node('QuantizeLinear', ['x', 'xs', 'xz'], ['xq']),
             h.make_node('DequantizeLinear', ['xq', 'xs', 'xz'], ['xd']),
             h.make_node('DequantizeLinear', ['wq', 'ws', 'wz'], ['wd'], axis=0),
             h.make_node('Conv', ['xd', 'wd'], ['y'], pads=[1, 1, 1, 1])]
    g = h.make_graph(nodes, 'g', [h.make_tensor_value_info('x', T.FLOAT, [1, cin, 32, 32])],
                     [h.make_tensor_value_info('y', T.FLOAT, None)], inits)
    return h.make_model(g, opset_imports=[h.make_opsetid('', 13)])
core = ov.Core()
cases = [(True, 127, 128, 4.0), (True, 64, 128, 4.0), (False, 127, 128, 4.0), (False, 64, 128, 4.0),
         (False, 127, 0, 0.5)]  # last: unsigned codes <= 16, full-range weights: no pair can overflow
for signed, wmax, zp, amp in cases:
    x = rng.uniform(-amp if zp else 0, amp, size=(1, 3, 32, 32)).astype(np.float32)
    m = model(signed, wmax, zp=zp)
    so = ort.SessionOptions(); so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    ref = ort.InferenceSession(m.SerializeToString(), so, providers=['CPUExecutionProvider']).run(None, {'x': x})[0]
    fused = ort.InferenceSession(m.SerializeToString(), providers=['CPUExecutionProvider']).run(None, {'x': x})[0]
    cm = core.compile_model(core.read_model(m.SerializeToString(), b''), 'CPU', {'INFERENCE_PRECISION_HINT': 'f32'})
    got = cm.create_infer_request().infer({0: x})[0]
    prec = [o.get_rt_info()['runtimePrecision'].astype(str) for o in cm.get_runtime_model().get_ordered_ops()
            if o.get_rt_info()['layerType'].astype(str) == 'Convolution']
    print(f"act {'int8 zp 0' if signed else f'uint8 zp {zp}'} |x|<={amp}, weights |w|<={wmax}: OV conv {prec}, "
          f"OV max|err| {np.abs(got - ref).max():.4g}, ORT fused max|err| {np.abs(fused - ref).max():.4g}")
