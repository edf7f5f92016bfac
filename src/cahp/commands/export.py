"""``cahp export``: a dense or pruned model to ONNX, checked against PyTorch."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger("cahp.deploy.onnx")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", required=True, help="pruned model folder, or a short name (minilm-l6, mpnet-base), folder or Hub id"
    )
    p.add_argument("--onnx", required=True, type=Path, metavar="OUT.onnx", help="where to write the ONNX file")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    p.add_argument("--atol", type=float, default=1e-4, help="largest accepted |onnx - torch| of the logits")
    p.add_argument("--no-verify", action="store_true", help="skip the onnxruntime check")


def run(args) -> int:
    import cahp
    from cahp.deploy.onnx import export_onnx, verify_onnx

    if args.onnx.suffix != ".onnx":
        raise ValueError(f"--onnx should name a .onnx file, got {args.onnx}")
    model, _ = cahp.load_model(args.model, with_tokenizer=False)
    path = export_onnx(model, args.onnx, opset=args.opset)
    kept = cahp.kept_heads(model)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB): heads per layer {[len(v) for v in kept.values()]}")
    if not args.no_verify:
        check = verify_onnx(model, path, atol=args.atol)
        shapes = ", ".join(f"{s['batch']}x{s['seq']}: {s['max_abs_diff']:.1e}" for s in check["shapes"])
        print(f"onnxruntime matches PyTorch: max |diff| of the logits {check['max_abs_diff']:.1e} ({shapes})")
    return 0
