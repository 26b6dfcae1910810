"""Running SREC for inference: the graphs' contract, export, one module per backend, and backend selection.

    contract   the three graphs' tensors, the export manifest, input checks, the `Backend` protocol
    export     SREC -> three ONNX graphs + manifest, and the per-model export cache
    torch_backend, onnxruntime_backend, tensorrt_backend   the backends
    selection  `create_backend(name, ...)`, `auto`, BACKENDS
"""
