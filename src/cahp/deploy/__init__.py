"""What ships: self-contained pruned folders (`folder`), sentence-transformers files (`sentence`),
ONNX export (`onnx`), its int8 copy (`quantize`) and scoring either on a task (`runtime`)."""
