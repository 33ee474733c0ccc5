"""Tools around the pass, not part of it: `export` (torch -> ONNX, with `causal_lm`
loading and `export_check`), `evaluate` (perplexity and fidelity), `logits` (the
session both evaluation and self-calibration read logits from), `self_calib`
(calibration sampled from the model, the calibration source "self"), `tokenizer`."""
