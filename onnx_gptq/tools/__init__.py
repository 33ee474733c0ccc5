"""Tools around the pass, not part of it: `export` (torch -> ONNX), `evaluate`
(perplexity and fidelity), `self_calib` (calibration sampled from the model,
plugged in as the calibration source "self"), `tokenizer` (loading tokenizers
for text calibration and evaluation)."""
