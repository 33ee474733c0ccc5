"""Taps that keep padded positions out of X^T X (for batches padded with attention_mask 0).

The augmented graph gets one more input, :data:`TOKEN_MASK` (bool [B, S]: True
at real tokens; the host feeds the batch's attention mask, or an empty [0, 0]
array for a batch without padding). Per tapped activation ``x`` (``xf`` its
float32 [N, K] rows), an ``If`` picks one of two branches at run time:

* rows map to tokens -- N == B*S and x's first dim is B (``[B, S, ..., K]``)
  or B*S (a flattened ``[B*S, K]``, as Gemm exports have) -- then
  ``xm = Where(mask, xf, 0)``, ``X^T X = xm^T xm`` and the rows counted are
  the real tokens;
* otherwise (one row per sample, as BERT's pooler reads, or rows per head):
  all N rows, as unpadded calibration takes them. Such an activation has no
  row per padded position to drop; the tap's third output says which branch
  ran, and the host names the activation when a padded batch took this one.

Zeroing with ``Where`` rather than multiplying by the mask keeps a padded
row's NaN or Inf (a fully masked attention row) out of the sums.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper, numpy_helper
import numpy as np

TOKEN_MASK = "onnx_gptq_calib/token_mask"
_SHARED = "onnx_gptq_calib/mask"


def mask_nodes() -> tuple[list[onnx.NodeProto], list[TensorProto], onnx.ValueInfoProto]:
    """Nodes and constants shared by every masked tap, and the mask's graph input.

    Outputs made: ``{_SHARED}/col`` bool [B*S, 1], ``/tokens`` int64 () = B*S,
    ``/batch`` int64 () = B, ``/real`` int64 () = real tokens, ``/zero`` float ().
    """
    p = _SHARED
    consts = [numpy_helper.from_array(np.array([-1, 1], np.int64), f"{p}/col_shape"),
              numpy_helper.from_array(np.array(0, np.int64), f"{p}/i0"),
              numpy_helper.from_array(np.array(0.0, np.float32), f"{p}/zero")]
    nodes = [
        helper.make_node("Reshape", [TOKEN_MASK, f"{p}/col_shape"], [f"{p}/col"], name=f"{p}/Reshape"),
        helper.make_node("Size", [TOKEN_MASK], [f"{p}/tokens"], name=f"{p}/Size"),
        helper.make_node("Shape", [TOKEN_MASK], [f"{p}/shape"], name=f"{p}/Shape"),
        helper.make_node("Gather", [f"{p}/shape", f"{p}/i0"], [f"{p}/batch"], axis=0, name=f"{p}/Batch"),
        helper.make_node("Cast", [TOKEN_MASK], [f"{p}/i64"], to=TensorProto.INT64, name=f"{p}/Cast"),
        helper.make_node("ReduceSum", [f"{p}/i64"], [f"{p}/real"], keepdims=0, name=f"{p}/Real"),
    ]
    value = helper.make_tensor_value_info(TOKEN_MASK, TensorProto.BOOL, ["batch", "sequence"])
    return nodes, consts, value


def masked_tap_nodes(x: str, xf: str, stem: str, k: int, xtx_output: str, size_output: str,
                     mapped_output: str) -> list[onnx.NodeProto]:
    """The If that computes one tap's X^T X, counted elements and branch flag.

    Args:
        x: the activation as the model computes it (its first dim is tested).
        xf: its float32 [N, K] rows.
        stem: unique prefix for the names made here.
        k: the activation's last dim.
        xtx_output: float32 [K, K].
        size_output: int64 (): elements of the rows counted (rows * K).
        mapped_output: bool (): True when the rows mapped to tokens and padding was dropped.
    """
    p = _SHARED
    k_const = helper.make_tensor(f"{stem}/k", TensorProto.INT64, [], [k])
    then_nodes = [
        helper.make_node("Where", [f"{p}/col", xf, f"{p}/zero"], [f"{stem}/xm"], name=f"{stem}/Zero"),
        helper.make_node("Transpose", [f"{stem}/xm"], [f"{stem}/xmt"], perm=[1, 0], name=f"{stem}/TransposeM"),
        helper.make_node("MatMul", [f"{stem}/xmt", f"{stem}/xm"], [f"{stem}/xtx_m"], name=f"{stem}/MatMulM"),
        helper.make_node("Constant", [], [f"{stem}/k_m"], value=k_const, name=f"{stem}/KM"),
        helper.make_node("Mul", [f"{p}/real", f"{stem}/k_m"], [f"{stem}/size_m"], name=f"{stem}/SizeM"),
    ]
    else_nodes = [
        helper.make_node("Transpose", [xf], [f"{stem}/xt"], perm=[1, 0], name=f"{stem}/Transpose"),
        helper.make_node("MatMul", [f"{stem}/xt", xf], [f"{stem}/xtx_a"], name=f"{stem}/MatMul"),
        helper.make_node("Size", [xf], [f"{stem}/size_a"], name=f"{stem}/Size"),
    ]

    def branch(name: str, nodes: list[onnx.NodeProto], xtx: str, size: str) -> onnx.GraphProto:
        return helper.make_graph(nodes, name, [], [
            helper.make_tensor_value_info(xtx, TensorProto.FLOAT, [k, k]),
            helper.make_tensor_value_info(size, TensorProto.INT64, [])])

    return [
        helper.make_node("Shape", [xf], [f"{stem}/xf_shape"], name=f"{stem}/RowsShape"),
        helper.make_node("Gather", [f"{stem}/xf_shape", f"{p}/i0"], [f"{stem}/rows"], axis=0, name=f"{stem}/Rows"),
        helper.make_node("Shape", [x], [f"{stem}/x_shape"], name=f"{stem}/XShape"),
        helper.make_node("Gather", [f"{stem}/x_shape", f"{p}/i0"], [f"{stem}/lead"], axis=0, name=f"{stem}/Lead"),
        helper.make_node("Equal", [f"{stem}/rows", f"{p}/tokens"], [f"{stem}/same_rows"], name=f"{stem}/SameRows"),
        helper.make_node("Equal", [f"{stem}/lead", f"{p}/batch"], [f"{stem}/lead_b"], name=f"{stem}/LeadB"),
        helper.make_node("Equal", [f"{stem}/lead", f"{p}/tokens"], [f"{stem}/lead_bs"], name=f"{stem}/LeadBS"),
        helper.make_node("Or", [f"{stem}/lead_b", f"{stem}/lead_bs"], [f"{stem}/lead_ok"], name=f"{stem}/LeadOk"),
        helper.make_node("And", [f"{stem}/same_rows", f"{stem}/lead_ok"], [mapped_output], name=f"{stem}/Mapped"),
        helper.make_node("If", [mapped_output], [xtx_output, size_output], name=f"{stem}/If",
                         then_branch=branch(f"{stem}/masked", then_nodes, f"{stem}/xtx_m", f"{stem}/size_m"),
                         else_branch=branch(f"{stem}/all_rows", else_nodes, f"{stem}/xtx_a", f"{stem}/size_a")),
    ]


__all__ = ["TOKEN_MASK", "mask_nodes", "masked_tap_nodes"]
