"""Stage 2, calibration: the Hessian statistics of every quantized layer's input.

* `statistics`: :class:`HessianStats`, per-weight sums, the memory planner.
* `taps`: the augmented graph that makes onnxruntime compute X^T X.
* `run`: :func:`collect_hessians`, one pass or several over the data.
* `sequential`: stage-by-stage calibration (`partition`, `activation_cache`).
* `sources`, `model_inputs`, `batching`: calibration data to onnxruntime feeds.
"""

from onnx_gptq.calibrate.batching import make_batches
from onnx_gptq.calibrate.model_inputs import ModelInputs
from onnx_gptq.calibrate.run import collect_hessians
from onnx_gptq.calibrate.statistics import HessianStats

__all__ = ["HessianStats", "ModelInputs", "collect_hessians", "make_batches"]
