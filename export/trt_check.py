"""Static check that TensorRT's ONNX parser will accept a graph, runnable on CPU.

TensorRT is only available on NVIDIA machines, but whether its parser takes a
graph is decidable from the graph alone: every op must be in the parser's
support matrix and meet its restrictions (onnx-tensorrt ``docs/operators.md``,
TensorRT 10.x: opsets 9..24). The motivating case: TensorRT's GridSample layer
is rank-4 only (NVIDIA/TensorRT issues 3207, 3890), so a registration graph
that samples volumes with ONNX GridSample cannot build; ours uses gathers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gvsl.export.errors import ExportError

#: opset range of TensorRT 10's ONNX parser (10.0 supports up to 20; 10.15 up to 24).
OPSET_RANGE = (9, 24)

#: Operators the TensorRT 10 ONNX parser supports ("Y" rows of its support matrix).
SUPPORTED_OPS = frozenset(
    """
    Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh Attention AveragePool
    BatchNormalization BlackmanWindow Cast CastLike Ceil Celu Clip Concat Constant
    ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DeformConv DepthToSpace
    DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor
    Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool
    Greater GreaterOrEqual GridSample GroupNormalization GRU HammingWindow HannWindow
    HardSigmoid HardSwish Hardmax Identity If ImageScaler InstanceNormalization IsInf
    IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM
    LpNormalization LpPool MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish
    Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad ParametricSoftplus Pow
    PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform RandomUniformLike
    Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean
    ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence
    RMSNormalization RNN RoiAlign RotaryEmbedding Round STFT ScaledTanh Scan Scatter
    ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax
    Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh TensorScatter
    ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
    """.split()
)

#: Operators it explicitly rejects ("N" rows), for a more specific message.
UNSUPPORTED_OPS = frozenset(
    """
    AffineGrid Bernoulli BitShift BitwiseAnd BitwiseNot BitwiseOr BitwiseXor Col2Im
    CenterCropPad Compress ConcatFromSequence ConvInteger DFT Det DynamicQuantizeLinear
    ImageDecoder MatMulInteger MaxRoiPool MaxUnpool MelWeightMatrix Multinomial
    NegativeLogLikelihoodLoss Optional OptionalGetElement OptionalHasElement QLinearConv
    QLinearMatMul RegexFullMatch SequenceAt SequenceConstruct SequenceEmpty SequenceErase
    SequenceInsert SequenceLength SequenceMap SoftmaxCrossEntropyLoss SplitToSequence
    StringConcat StringNormalizer StringSplit TfIdfVectorizer Unique
    """.split()
)

_RESIZE_COORD = {"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"}
_RESIZE_NEAREST = {"floor", "ceil", "round_prefer_floor", "round_prefer_ceil"}
#: ONNX element types TensorRT 10 has: FLOAT, UINT8, INT8, INT32, INT64, BOOL, FLOAT16, DOUBLE (cast down),
#: BFLOAT16, FP8 (E4M3), INT4, FP4.
_TRT_TYPES = {1, 2, 3, 6, 7, 9, 10, 11, 16, 17, 22, 23}
#: ops whose axes-like input must be a build-time constant (opset 13+/18+ made them inputs)
_CONST_INPUT = {
    "Squeeze": 1,
    "Unsqueeze": 1,
    "CumSum": 1,
    "OneHot": 1,
    "TopK": 1,
    **{
        op: 1
        for op in (
            "ReduceL1",
            "ReduceL2",
            "ReduceLogSum",
            "ReduceLogSumExp",
            "ReduceMax",
            "ReduceMean",
            "ReduceMin",
            "ReduceProd",
            "ReduceSum",
            "ReduceSumSquare",
        )
    },
}


@dataclass(frozen=True)
class TrtIssue:
    """One reason TensorRT's parser would reject the graph."""

    node: str
    op: str
    message: str

    def __str__(self) -> str:
        return f"{self.op} ({self.node or 'unnamed'}): {self.message}"


def _attr(node: Any, name: str, default: Any = None) -> Any:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            v = helper.get_attribute_value(a)
            return v.decode() if isinstance(v, bytes) else v
    return default


def check_tensorrt(model: Any) -> list[TrtIssue]:
    """Every op or rank in ``model`` (path or ModelProto) that TensorRT 10's ONNX
    parser rejects; an empty list means the graph should parse."""
    import onnx

    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(Path(model)), load_external_data=False)
    try:
        inferred = onnx.shape_inference.infer_shapes(proto)
    except Exception:  # shape inference is best-effort here; op checks still run
        inferred = proto
    g = inferred.graph
    info: dict[str, Any] = {}
    for v in list(g.input) + list(g.value_info) + list(g.output):
        info[v.name] = v.type.tensor_type
    const = {i.name for i in g.initializer} | {o for n in g.node if n.op_type == "Constant" for o in n.output}
    graph_io = {v.name for v in g.input} | {v.name for v in g.output}

    def rank(name: str) -> int | None:
        t = info.get(name)
        return len(t.shape.dim) if t is not None and t.HasField("shape") else None

    issues: list[TrtIssue] = []
    for imp in proto.opset_import:
        if imp.domain in ("", "ai.onnx") and not (OPSET_RANGE[0] <= imp.version <= OPSET_RANGE[1]):
            issues.append(
                TrtIssue("", "opset", f"opset {imp.version} outside TensorRT 10's {OPSET_RANGE[0]}..{OPSET_RANGE[1]}")
            )
    for node in g.node:
        op, name = node.op_type, node.name
        if node.domain not in ("", "ai.onnx"):
            issues.append(TrtIssue(name, op, f"custom domain {node.domain!r}: needs a TensorRT plugin"))
            continue
        if op in UNSUPPORTED_OPS:
            issues.append(TrtIssue(name, op, "not supported by TensorRT's ONNX parser"))
            continue
        if op not in SUPPORTED_OPS:
            issues.append(TrtIssue(name, op, "not in TensorRT's ONNX operator support matrix"))
            continue
        r = rank(node.input[0]) if node.input else None
        if op == "GridSample" and r is not None and r != 4:
            issues.append(TrtIssue(name, op, f"{r}-D input; TensorRT's GridSample takes rank-4 (2-D) inputs only"))
        if op in ("Conv", "ConvTranspose", "MaxPool", "AveragePool") and r is not None and r not in (4, 5):
            issues.append(TrtIssue(name, op, f"rank-{r} input; TensorRT supports 2-D or 3-D {op} only"))
        if op == "MaxPool" and len(node.output) > 1 and node.output[1]:
            issues.append(TrtIssue(name, op, "the Indices output is unsupported"))
        if op in ("MaxPool", "AveragePool", "LpPool") and any(d != 1 for d in (_attr(node, "dilations") or [])):
            issues.append(TrtIssue(name, op, "dilations must be all ones"))
        if op == "InstanceNormalization" and r is not None and not 3 <= r <= 5:
            issues.append(TrtIssue(name, op, f"rank-{r} input; TensorRT needs rank 3..5"))
        if op == "Resize":
            mode = _attr(node, "mode", "nearest")
            coord = _attr(node, "coordinate_transformation_mode", "half_pixel")
            if mode not in ("nearest", "linear"):
                issues.append(TrtIssue(name, op, f"mode {mode!r}; TensorRT supports nearest and linear"))
            if coord not in _RESIZE_COORD:
                issues.append(TrtIssue(name, op, f"coordinate_transformation_mode {coord!r} is unsupported"))
            if mode == "nearest" and _attr(node, "nearest_mode", "round_prefer_floor") not in _RESIZE_NEAREST:
                issues.append(TrtIssue(name, op, f"nearest_mode {_attr(node, 'nearest_mode')!r} is unsupported"))
            if _attr(node, "antialias", 0):
                issues.append(TrtIssue(name, op, "antialiasing is unsupported"))
        if op == "Dropout" and len(node.input) > 2 and node.input[2] and node.input[2] not in const:
            issues.append(TrtIssue(name, op, "training_mode must be a constant False"))
        idx = _CONST_INPUT.get(op)
        if idx is not None and len(node.input) > idx and node.input[idx] and node.input[idx] not in const:
            issues.append(TrtIssue(name, op, f"input {idx} ({node.input[idx]}) must be a build-time constant"))
        for t in list(node.input) + list(node.output):
            tt = info.get(t)
            if tt is not None and tt.elem_type and tt.elem_type not in _TRT_TYPES:
                issues.append(TrtIssue(name, op, f"tensor {t} has ONNX type {tt.elem_type}, which TensorRT lacks"))
            elif tt is not None and tt.elem_type == 2 and t not in graph_io:  # UINT8
                issues.append(TrtIssue(name, op, f"tensor {t} is UINT8, allowed only as a network input/output"))
    return issues


def assert_tensorrt_compatible(model: Any, label: str = "graph") -> None:
    """Raise :class:`ExportError` listing (up to 3) reasons TensorRT would reject ``model``."""
    issues = check_tensorrt(model)
    if issues:
        shown = "; ".join(str(i) for i in issues[:3])
        more = f" (+{len(issues) - 3} more)" if len(issues) > 3 else ""
        raise ExportError(
            f"{label}: TensorRT's ONNX parser would reject it: {shown}{more}; export the registration "
            "graph with --warp gather for TensorRT"
        )


__all__ = [
    "OPSET_RANGE",
    "SUPPORTED_OPS",
    "TrtIssue",
    "UNSUPPORTED_OPS",
    "assert_tensorrt_compatible",
    "check_tensorrt",
]
