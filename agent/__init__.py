"""hwnas-agent: the measurement server that runs on a target device (ONNX Runtime, onnx, numpy, aiohttp only)."""
