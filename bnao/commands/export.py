"""``bnao export``: write a trained network as TorchScript, ONNX or a plain state dict.

The exported network is the inference network (no auxiliary head, no
drop-path, no dropout). After writing, the file is loaded back the way user
code would load it (``torch.jit.load``, onnxruntime, ``build_network`` +
``load_state_dict``) and run on a random batch; the largest difference to the
original network's logits is printed, and the exit code is 1 when it exceeds
the tolerance.
"""

from __future__ import annotations

import argparse
import json

from .errors import report_error

HELP = "export a trained model as TorchScript, ONNX or a state dict"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds ``bnao export``'s arguments."""
    parser.epilog = (
        "Examples: `bnao export runs/final/model.pt --format torchscript --out net.ts`; "
        "`bnao export \"0 1 0 1 ...\" --weights my_state_dict.pt --format onnx --out net.onnx`. "
        "TorchScript loads with torch.jit.load, ONNX with onnxruntime, neither needs bnao.")
    parser.add_argument("model", metavar="MODEL",
                        help="model.pt (or checkpoint.pt) written by `bnao train`; with --weights: the arch string")
    parser.add_argument("--weights", metavar="FILE", default=None,
                        help="weights of the arch given as MODEL: a torch.save(net.state_dict()) file of a "
                             "bnao.nets.build_network network, or a `bnao train` checkpoint")
    parser.add_argument("--format", choices=("torchscript", "onnx", "state_dict"), default="torchscript",
                        help="default torchscript")
    parser.add_argument("--out", required=True, metavar="FILE", help="file to write")
    parser.add_argument("--image-size", type=int, default=None,
                        help="input side for the trace and the check (default: the training data set's, "
                             "else 32 for the CIFAR skeleton and 224 for ImageNet)")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest accepted difference, relative to max(1, max |logit|) (default 1e-4)")
    parser.add_argument("--space", choices=("small", "middle"), default=None,
                        help="op set of the arch given with --weights (default small)")
    parser.add_argument("--nodes", type=int, default=None, help="nodes per cell of that arch (default: length / 8)")
    parser.add_argument("--onnx-exporter", choices=("auto", "dynamo", "torchscript"), default="auto",
                        help="auto: torch.export-based when onnxscript is installed, else the TorchScript-based one")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    """Runs ``bnao export``; exit code 2 for bad input, 1 when the exported outputs differ too much."""
    import torch

    from ..export import ExportError, export_network, load_for_export

    def fail(message: str) -> int:
        return report_error("export", message)

    if args.threads is not None:
        if args.threads < 1:
            return fail("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    try:
        if args.weights is not None:
            source = load_for_export(args.weights, arch=args.model, op_set=args.space, num_nodes=args.nodes)
        else:
            source = load_for_export(args.model)
        result = export_network(source, args.format, args.out, image_size=args.image_size,
                                tolerance=args.tolerance, onnx_exporter=args.onnx_exporter, opset=args.opset)
    except ExportError as err:
        return fail(str(err))
    result["arch"] = source.config["arch"]
    result["source"] = source.origin
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print_result(result, source.config)
    return 0 if result["ok"] else 1


def _print_result(result, config) -> None:
    cfg = config
    print(f"bnao export: {result['source']} -> {result['format']} {result['out']}\n"
          f"  arch {cfg['arch']}\n  {cfg['skeleton']} skeleton, N={cfg['layers']} C={cfg['channels']}, "
          f"{cfg['num_classes']} classes, input [batch, {', '.join(map(str, result['input_shape'][1:]))}]")
    if result["max_abs_diff"] is None:
        print(f"  not checked: {result['note']}")
    else:
        verdict = "ok" if result["ok"] else "TOO LARGE"
        print(f"  check on a random batch of {result['input_shape'][0]}: largest |exported - original| = "
              f"{result['max_abs_diff']:.3g} (largest |logit| {result['max_abs_output']:.3g}, tolerance "
              f"{result['tolerance']:g} x max(1, that)) -> {verdict}")
    if result["format"] == "state_dict":
        space = cfg["space"]
        print(f"  load it: net = bnao.nets.build_network({cfg['arch']!r}, bnao.NAOSpace(num_nodes={space['num_nodes']}, "
              f"op_set={space['op_set']!r}), skeleton={cfg['skeleton']!r}, layers={cfg['layers']}, "
              f"channels={cfg['channels']}, num_classes={cfg['num_classes']}, in_channels={cfg['in_channels']}); "
              f"net.load_state_dict(torch.load({result['out']!r}))")
