"""The onnxruntime side: `sessions` (providers, the one session factory, feeds,
errors) and `custom_ops` (the loader of the library that runs GptqMatMul).
Nothing outside this package imports onnxruntime."""
