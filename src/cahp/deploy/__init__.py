"""What ships: self-contained pruned folders (`folder`), sentence-transformers files (`sentence`),
model cards (`card`), ONNX export (`onnx`) and its int8 copy (`quantize`)."""
