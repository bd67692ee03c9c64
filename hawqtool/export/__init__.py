"""Export a prepared model to ONNX with its quantized layers, per allocation.

The search exports many allocations of one model, so the expensive work happens once in
:meth:`QDQExporter.build`: the BN-folded float model is exported with ``torch.onnx`` (dynamo
exporter, dynamic batch and token axes; :mod:`~hawqtool.export.torch_export`), every copy and
every use of each layer's weight is found and the weight stored once
(:mod:`~hawqtool.export.locate`), and activation ranges are calibrated once with onnxruntime's own
calibrators (:mod:`~hawqtool.export.calibrate`). Each :meth:`QDQExporter.quantized_model` call is
then graph surgery on protobufs (milliseconds once a layer's weights are quantized).

What a quantized layer becomes (the placement onnxruntime 1.32's CPU QDQ fusion turns into
integer kernels; see ``tests/test_export.py`` and ``tests/test_export_kinds.py``)::

    activation formats (intB):
    x ─► Q(u8) ─► DQ ─┐
    W_int ─► DQ(axis) ─┴► Conv / Gemm / MatMul(+bias Add) [─► Relu] ─► Q(u8) ─► DQ ─► ...

    weight-only block formats (intB-bK) on MatMul / Gemm:   x ─► MatMulNBits(W_packed, scales)
    asymmetric blocks (uintB-bK) on MatMul / Gemm:          x ─► MatMulNBits(W_packed, scales, zero_points)
    weight-only formats on an embedding:                    ids ─► GatherBlockQuantized(W_packed, scales[, zero_points])
    dynamic formats (intB-d) on MatMul / Gemm:              x ─► DynamicQuantizeLinear ─► MatMulInteger(W_int8)
                                                            ─► Cast ─► Mul(x_scale · scales) [─► Add bias]
    other weight-only cases:                                W_int ─► DQ ─► op

- weights: the integers and float32 scales of :func:`hawqtool.quantizer.quantize_as` (the function
  sensitivity scores), written by the emitters registered for the format's family
  (:func:`~hawqtool.export.emitters.register_emitters`), stored once per layer in the bits
  :func:`hawqtool.formats.storage_bits` counts.
- activations: for ``intB`` formats, the tensor entering each node that computes with the weight
  and the tensor leaving it (after a Relu/Clip that is its only consumer, which onnxruntime folds
  into the Q) get Q→DQ with a uint8 scale and zero point from the calibrated range (onnxruntime's
  formula). The output Q is what lets onnxruntime fuse ``DQ → Conv → Q`` into ``QLinearConv`` (and
  Gemm into ``QGemm``, even for the logits); without it the layer runs in float. From there the
  uint8 region grows through pooling, reshapes and residual adds whose inputs are all quantized
  (:func:`quantization_plan`), as ``quantize_static`` does, so that nothing round-trips through
  float between integer kernels.
- ``float`` layers keep their float weights; they see quantized activations only where a
  neighbouring quantized layer quantizes the tensor they share (as the integer kernels would).
- files past protobuf's 2 GiB limit keep their tensors in an external ``.data`` file, and such a
  model is opened in onnxruntime from a temporary copy written the same way, never serialized
  whole (:mod:`~hawqtool.export.writer`); every probe is graph surgery on the one float export.

For uniform int8 the optimized onnxruntime graph is the same, node for node, as that of
onnxruntime's own ``quantize_static`` (QDQ, uint8/int8 per-channel) on the zoo CNNs.

onnx and onnxruntime are imported inside the functions that use them (the only function-level
imports here): the analysis stages import this package for its arithmetic (``uint8_qparams``) and
must not load onnxruntime.
"""

from __future__ import annotations

from hawqtool.export.calibrate import CALIBRATION_METHODS, ActivationQuant, calibrate, uint8_qparams
from hawqtool.export.emitters import (
    EMITTERS,
    DequantizeLinearEmitter,
    DynamicMatMulEmitter,
    Emission,
    Emitter,
    GatherBlockQuantizedEmitter,
    LayerContext,
    MatMulNBitsEmitter,
    PackedEmitter,
    PackedOp,
    register_emitters,
    unregister_emitters,
)
from hawqtool.export.exporter import INT4_STORAGES, METADATA_ALLOCATION, METADATA_VERSION, QDQExporter
from hawqtool.export.locate import LayerSite, WeightUse, locate_layers
from hawqtool.export.pack import offset_unsigned, pack_int2, pack_int4, pack_rows
from hawqtool.export.plan import REQUANT_OPS, SHARED_SCALE_OPS, quantization_plan
from hawqtool.export.torch_export import (
    INPUT_NAME,
    MIN_OPSET,
    OUTPUT_NAME,
    TORCH_MAX_OPSET,
    export_float_onnx,
)
from hawqtool.export.writer import PROTOBUF_LIMIT, external_data_path, session_source, write_model

__all__ = [
    "CALIBRATION_METHODS",
    "EMITTERS",
    "INPUT_NAME",
    "INT4_STORAGES",
    "METADATA_ALLOCATION",
    "METADATA_VERSION",
    "MIN_OPSET",
    "OUTPUT_NAME",
    "PROTOBUF_LIMIT",
    "REQUANT_OPS",
    "SHARED_SCALE_OPS",
    "TORCH_MAX_OPSET",
    "ActivationQuant",
    "DequantizeLinearEmitter",
    "DynamicMatMulEmitter",
    "Emission",
    "Emitter",
    "GatherBlockQuantizedEmitter",
    "LayerContext",
    "LayerSite",
    "MatMulNBitsEmitter",
    "PackedEmitter",
    "PackedOp",
    "QDQExporter",
    "WeightUse",
    "calibrate",
    "export_float_onnx",
    "external_data_path",
    "locate_layers",
    "offset_unsigned",
    "pack_int2",
    "pack_int4",
    "pack_rows",
    "quantization_plan",
    "register_emitters",
    "session_source",
    "uint8_qparams",
    "unregister_emitters",
    "write_model",
]
