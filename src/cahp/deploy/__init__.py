"""What ships: ONNX export."""
