"""``cahp export``: a dense or pruned model to ONNX (fp32, and int8 with ``--int8``), checked against PyTorch."""

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
    p.add_argument(
        "--int8",
        action="store_true",
        help="also write OUT.int8.onnx: onnxruntime dynamic quantisation (int8 weights), checked against PyTorch fp32 "
        "within --int8-rtol of the logit scale",
    )
    p.add_argument(
        "--int8-rtol",
        type=float,
        default=None,
        help="largest accepted max|int8 - fp32| of the logits over max(1, max|fp32 logit|) (default 0.1)",
    )


def run(args) -> int:
    import cahp
    from cahp.deploy.onnx import export_onnx, verify_onnx

    if args.onnx.suffix != ".onnx":
        raise ValueError(f"--onnx should name a .onnx file, got {args.onnx}")
    if args.int8_rtol is not None and not args.int8:
        raise ValueError("--int8-rtol applies to --int8 only")
    model, _ = cahp.load_model(args.model, with_tokenizer=False)
    path = export_onnx(model, args.onnx, opset=args.opset)
    kept = cahp.kept_heads(model)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB): heads per layer {[len(v) for v in kept.values()]}")
    if not args.no_verify:
        check = verify_onnx(model, path, atol=args.atol)
        shapes = ", ".join(f"{s['batch']}x{s['seq']}: {s['max_abs_diff']:.1e}" for s in check["shapes"])
        print(f"onnxruntime matches PyTorch: max |diff| of the logits {check['max_abs_diff']:.1e} ({shapes})")
    if args.int8:
        from cahp.deploy.quantize import INT8_RTOL, quantize_int8, verify_int8

        q = quantize_int8(path)
        print(f"wrote {q} ({q.stat().st_size / 1e6:.1f} MB, int8 weights)")
        if not args.no_verify:
            rtol = INT8_RTOL if args.int8_rtol is None else args.int8_rtol
            check = verify_int8(model, q, rtol=rtol)
            print(
                f"int8 within tolerance of PyTorch fp32: max |diff| of the logits {check['max_abs_diff']:.1e} "
                f"({check['relative_diff']:.3f} of the logit scale, tolerance {rtol}), "
                f"same predicted class on {check['argmax_agreement']:.0%} of rows"
            )
    return 0
