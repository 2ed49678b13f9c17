"""Command line: ``pyzeroq eval`` / ``pyzeroq quantize`` / ``pyzeroq detect-quantize``."""

from __future__ import annotations

import argparse
import sys

from .config import ACT_DTYPES, DISTILL_METHODS, SCHEMES, TARGETS, QuantConfig, ReconstructionConfig
from .data import fashion_mnist_available, load_fashion_mnist


def _eval_split(choice: str) -> str | None:
    if choice == "auto":
        return "test" if fashion_mnist_available() else "embedded"
    return None if choice == "none" else choice


def _bits_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(b) for b in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--mixed expects comma-separated integers such as 2,4,8, got {text!r}") from None


def cmd_eval(args) -> int:
    from . import evaluate, models
    split = _eval_split(args.split)
    images, labels = load_fashion_mnist(split)
    model = models.load_pretrained(args.model)
    result = evaluate(model, images, labels, progress=True)
    print(f"{args.model} on Fashion-MNIST {split} ({result.num_images} images)\n")
    print(result.table())
    return 0


def _check_unused_flags(args) -> None:
    """ValueError naming a flag given where it has no effect (instead of ignoring it)."""
    if not args.mixed:
        given = [flag for flag, on in (("--sensitivity-act-quant", args.sensitivity_act_quant),
                                       ("--mp-method", args.mp_method != "zeroq"),
                                       ("--no-relaxation", args.no_relaxation),
                                       ("--mp-eval-samples", args.mp_eval_samples != QuantConfig.mp_eval_samples))
                 if on]
        if given:
            raise ValueError(f"{', '.join(given)} set(s) the mixed-precision search: it needs --mixed")
    if not args.reconstruction_iters and args.guard_samples != ReconstructionConfig.guard_samples:
        raise ValueError("--guard-samples sets the reconstruction guard: it needs --reconstruction-iters")
    if args.mixed and len(set(args.mixed)) < 2:
        raise ValueError(f"--mixed needs at least two different bit widths to choose from, got "
                         f"{','.join(map(str, args.mixed))}")
    if args.act_bits == 0:
        given = [flag for flag, on in (("--act-range", args.act_range != "minmax"), ("--percentile", args.percentile
                 is not None), ("--act-dtype", args.act_dtype is not None)) if on]
        if given:
            raise ValueError(f"{', '.join(given)} set(s) the activation quantization: --act-bits 0 keeps them float")
    if args.calibration != "distilled":
        given = [flag for flag, on in (("--distill-iters", args.distill_iters != QuantConfig.distill_iters),
                                       ("--distill-method", args.distill_method != "zeroq"),
                                       ("--distill-relax", args.distill_relax != 0.0),
                                       ("--distill-augment", args.distill_augment)) if on]
        if given:
            raise ValueError(f"{', '.join(given)} set(s) the data distillation: it needs --calibration distilled")


def cmd_quantize(args) -> int:
    from . import QuantConfig, evaluate, models, quantize
    from ._checks import output_path

    if args.mixed:
        weight_bits = args.mixed
        if args.avg_weight_bits is None:
            raise ValueError("--mixed needs --avg-weight-bits (the average weight bits the mixed precision must fit)")
    else:
        weight_bits = args.weight_bits
    if args.plot is not None:  # checked now, not after the quantization
        if not args.mixed or args.mp_method != "zeroq":
            raise ValueError("--plot draws the Pareto frontier of a mixed-precision search: it needs --mixed "
                             "and --mp-method zeroq")
        output_path(args.plot, "--plot")
    reconstruction = None
    if args.reconstruction_iters:
        reconstruction = ReconstructionConfig(iters=args.reconstruction_iters, seed=args.seed,
                                              guard_samples=args.guard_samples)
    _check_unused_flags(args)  # named by flag (QuantConfig would name its fields)
    config = QuantConfig(weight_bits=weight_bits, avg_weight_bits=args.avg_weight_bits,
                         act_bits=None if args.act_bits == 0 else args.act_bits, calibration=args.calibration,
                         num_samples=args.num_samples, distill_iters=args.distill_iters,
                         percentile=args.percentile, act_range=args.act_range, target=args.target,
                         weight_scheme=args.weight_scheme, act_dtype=args.act_dtype,
                         mp_relaxation=not args.no_relaxation, mp_eval_samples=args.mp_eval_samples,
                         mp_method=args.mp_method, seed=args.seed, device=args.device,
                         weight_range=args.weight_range, first_last_bits=args.first_last_bits,
                         sensitivity_act_quant=args.sensitivity_act_quant, distill_relax=args.distill_relax,
                         distill_augment=args.distill_augment, distill_method=args.distill_method,
                         reconstruction=reconstruction)
    split = _eval_split(args.eval)
    if split == "test" and not fashion_mnist_available():  # checked now, not after the quantization
        raise ValueError("--eval test needs the Fashion-MNIST test set, which is not installed (apt-get install -y "
                         "dataset-fashion-mnist); --eval embedded uses the images bundled with pyzeroq")
    model = models.load_pretrained(args.model)
    qmodel = quantize(model, config, input_shape=(1, 28, 28))
    report = qmodel.report
    print(f"\n{args.model}: weights {weight_bits if not args.mixed else 'MP' + str(args.avg_weight_bits)}"
          f" over {config.weight_candidates}, activations {config.act_bits or 'float'}, "
          f"calibration {config.calibration}\n")
    print("| layer | params | weight bits | sensitivity at chosen bits |")
    print("|---|---|---|---|")
    for name in report.layers:
        bits = qmodel.bit_widths[name]
        omega = report.sensitivity.get(name, {}).get(bits)
        print(f"| {name} | {report.params[name]} | {bits} | {'-' if omega is None else f'{omega:.3e}'} |")
    for note in report.notes:
        print(f"note: {note}")
    print(f"\nsize: {report.size_bytes / 1e6:.4f} MB (FP32: {report.fp_size_bytes / 1e6:.4f} MB)")
    if report.relaxation:
        print(f"Appendix-A refinement: exact KL {report.relaxation['exact_kl']:.4e} "
              f"(independent DP choice: {report.relaxation['independent_choice_exact_kl']:.4e}), "
              f"{report.relaxation['evaluations']} configurations re-evaluated")
    print("timings: " + ", ".join(f"{k} {v:.2f} s" for k, v in report.timings.items()))
    if report.float_ops:
        print("left in float: " + ", ".join(report.float_ops))
    if split:
        images, labels = load_fashion_mnist(split)
        fp = evaluate(model, images, labels, progress=True)
        q = evaluate(qmodel, images, labels, progress=True)
        agree = (fp.predictions == q.predictions).mean()
        print(f"\n| model | top-1 on {split} ({q.num_images}) |\n|---|---|")
        print(f"| FP32 | {fp.top1 * 100:.2f} % |\n| quantized | {q.top1 * 100:.2f} % |")
        print(f"\nprediction agreement with FP32: {agree * 100:.2f} %")
    if args.plot:
        report.plot_pareto(args.plot)
        print(f"Pareto plot written to {args.plot}")
    return 0


def _add_low_bit_options(p: argparse.ArgumentParser) -> None:
    """The options for 2-4-bit weights and 4-bit activations (QuantConfig's docstring; all off by default)."""
    p.add_argument("--weight-range", default="minmax", choices=("minmax", "mse"),
                   help="per-channel weight ranges: min/max or the MSE-optimal clipping")
    p.add_argument("--first-last-bits", type=int, default=None,
                   help="weight bits of the first and last layer (e.g. 8; default: as the others)")
    p.add_argument("--sensitivity-act-quant", action="store_true",
                   help="mixed precision: measure the sensitivities with the activations quantized")
    p.add_argument("--distill-relax", type=float, default=0.0,
                   help="DSG slack of the per-sample BN targets in running stds (0: ZeroQ's exact targets)")
    p.add_argument("--distill-augment", action="store_true", help="random shift / flip at every distillation step")
    p.add_argument("--distill-method", default="zeroq", choices=DISTILL_METHODS,
                   help="distilled images: ZeroQ's optimized pixels or GENIE's generator + latents")
    p.add_argument("--reconstruction-iters", type=int, default=0,
                   help="block reconstruction (AdaRound rounding on BRECQ blocks) with this many steps per "
                        "block (0: off; 1000 is ReconstructionConfig's default)")
    p.add_argument("--guard-samples", type=int, default=ReconstructionConfig.guard_samples,
                   help="held-out images of the reconstruction guard (0: keep the reconstruction unguarded)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyzeroq", description="Zero-shot quantization for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("eval", help="evaluate a reference model on Fashion-MNIST")
    p.add_argument("--model", default="resnet20", choices=("resnet20", "mobilenetv2"))
    p.add_argument("--split", default="auto", choices=("auto", "test", "embedded"))
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("quantize", help="quantize a reference model with ZeroQ and print the result table")
    p.add_argument("--model", default="resnet20", choices=("resnet20", "mobilenetv2"))
    p.add_argument("--weight-bits", type=int, default=8)
    p.add_argument("--act-bits", type=int, default=8, help="0 keeps activations in float")
    p.add_argument("--mixed", type=_bits_list, default=None, help="candidate weight bits, e.g. 2,4,8")
    p.add_argument("--avg-weight-bits", type=float, default=None)
    p.add_argument("--calibration", default="distilled", choices=("distilled", "gaussian"))
    p.add_argument("--num-samples", type=int, default=32)
    p.add_argument("--distill-iters", type=int, default=QuantConfig.distill_iters)
    p.add_argument("--percentile", type=float, default=None)
    p.add_argument("--target", default=None, choices=sorted(TARGETS),
                   help="deployment preset for the code formats (symmetric int8 weights, int8 activations)")
    p.add_argument("--weight-scheme", default=None, choices=SCHEMES, help="weight quantization (default asymmetric)")
    p.add_argument("--act-dtype", default=None, choices=ACT_DTYPES, help="activation codes (default uint8)")
    p.add_argument("--act-range", default="minmax", choices=("minmax", "mse"),
                   help="activation ranges: observed min/max (or its percentiles) or the MSE-optimal clipping")
    _add_low_bit_options(p)
    p.add_argument("--mp-method", default="zeroq", choices=("zeroq", "random", "inverse"))
    p.add_argument("--no-relaxation", action="store_true", help="skip the Appendix-A grouped refinement")
    p.add_argument("--mp-eval-samples", type=int, default=QuantConfig.mp_eval_samples,
                   help="calibration images of the grouped search's exact re-evaluation (the reference code: 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--eval", default="auto", choices=("auto", "test", "embedded", "none"))
    p.add_argument("--plot", default=None, help="write the Pareto frontier plot to this PNG")
    p.set_defaults(func=cmd_quantize)

    try:
        from .detection.cli import add_parsers
    except ImportError:
        add_parsers = None
    if add_parsers is not None:
        add_parsers(sub)
    return parser


def main(argv=None) -> int:
    """Run one subcommand. Bad arguments (argparse's own checks, then the library's TypeError /
    ValueError / OSError, a corrupted checkpoint) print ``pyzeroq: error: <message>`` to stderr
    and return 2, without a traceback; anything else is a bug and keeps its traceback. Keeps freed
    memory in the process (:func:`pyzeroq.allocator.keep_freed_memory`)."""
    from ._checks import USER_ERRORS
    from .allocator import keep_freed_memory
    from .models import ChecksumError

    args = build_parser().parse_args(argv)
    keep_freed_memory()  # ~10x fewer page faults in distillation and the search (allocator.py)
    try:
        return args.func(args)
    except (*USER_ERRORS, ChecksumError) as exc:
        print(f"pyzeroq: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
