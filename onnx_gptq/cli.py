"""Command line: `onnx-gptq model.onnx --calib data.txt -o model.q4.onnx`.

Subcommands: `onnx-gptq export ...` (torch / transformers -> ONNX),
`onnx-gptq eval ...` (perplexity and fidelity through onnxruntime) and
`onnx-gptq generate ...` (text through onnxruntime with the KV cache).

Exit codes: 0 success, 2 bad input (a one-line message naming the file, node
or option), 1 internal error, 128 + the signal's number when stopped by
SIGINT (130), SIGTERM (143) or SIGHUP (129): all three unwind the run, so the
staging directory is removed and no partial output appears.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

from onnx_gptq import __version__
from onnx_gptq.contract import GATHER_BITS
from onnx_gptq.config import AUTO, SUPPORTED_BITS, Algo, CalibConfig, Format, LayerFilter, LayerRule, QuantConfig
from onnx_gptq.errors import UserError

logger = logging.getLogger("onnx_gptq")

SUBCOMMANDS = ("export", "eval", "generate")
# Option defaults come from the configs' own defaults, so the two cannot drift apart.
QUANT, CALIB, LAYERS = QuantConfig(), CalibConfig(), LayerFilter()


def _providers(text: str) -> tuple[str, ...]:
    from onnx_gptq.runtime.sessions import check_providers, default_providers

    if text == "auto":
        return default_providers()
    return check_providers(p.strip() for p in text.split(",") if p.strip())


def _bits_or_float(option: str, choices: Sequence[int]):  # noqa: ANN202 - an argparse type
    """An argparse type: 'float' -> None, 'auto' -> 'auto', else one of `choices` bits."""
    def parse(text: str) -> int | None | str:
        if text.lower() in ("float", "none", "fp"):
            return None
        if text.lower() == AUTO:
            return AUTO
        if text.isdigit() and int(text) in choices:
            return int(text)
        raise argparse.ArgumentTypeError(f"{text!r} is not auto, float or one of {', '.join(map(str, choices))}")

    parse.__name__ = option
    return parse


def _number_or_word(text: str) -> float | str:
    """An argparse type: a number, else the word itself (the config names what it accepts)."""
    try:
        return float(text)
    except ValueError:
        return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="onnx-gptq",
        description="GPTQ weight-only quantization of an ONNX model. "
                    "Also: 'onnx-gptq export --help', 'onnx-gptq eval --help', 'onnx-gptq generate --help'.")
    parser.add_argument("model", type=Path,
                        help="input .onnx model, or a model folder (onnxruntime-genai builder, Optimum, "
                             "onnx-gptq export: the .onnx its genai_config.json names, else model.onnx); "
                             "never modified")
    parser.add_argument("-o", "--output", type=Path,
                        help="output .onnx path; for a model folder, the output folder: created (its parent must "
                             "exist), given the quantized model, a copy of every other file and an updated "
                             "genai_config.json (default: <model>.q<bits>.onnx; <folder>-q<bits> for a folder)")
    parser.add_argument("--version", action="version", version=f"onnx-gptq {__version__}")

    data = parser.add_argument_group("calibration")
    data.add_argument("--calib", help="text file (needs --tokenizer), .npy / .jsonl token ids, "
                                      "or 'self' to sample sequences from the model itself")
    data.add_argument("--tokenizer", help="tokenizer.json, a transformers tokenizer directory, or a .gguf file "
                                          "(default: the model folder's)")
    data.add_argument("--num-samples", type=int, default=CALIB.num_samples,
                      help=f"sequences (default {CALIB.num_samples})")
    data.add_argument("--seq-len", type=int, default=CALIB.seq_len,
                      help=f"tokens per sequence (default {CALIB.seq_len})")
    data.add_argument("--batch-size", type=int, default=CALIB.batch_size,
                      help=f"sequences per onnxruntime run (default {CALIB.batch_size}; a GPU may want more)")
    data.add_argument("--seed", type=int, default=CALIB.seed,
                      help=f"seed for drawing calibration windows (default {CALIB.seed})")
    data.add_argument("--calib-split", default="auto", metavar="windows|samples",
                      help="cut text into random windows of one token stream (causal LMs) or one sample per "
                           "line/paragraph with the tokenizer's special tokens (encoders); default: by model kind")
    mode = data.add_mutually_exclusive_group()
    mode.add_argument("--sequential", nargs="?", const="on", default="auto", choices=["on", "off", "auto"],
                      help="on (the bare flag): collect each block's Hessians with earlier blocks already "
                           "quantized; off: one pass over the float model; auto (default): on where the graph "
                           "has cuts between its blocks, off where it has none")
    mode.add_argument("--one-pass", dest="sequential", action="store_const", const="off",
                      help="the same as --sequential off")
    data.add_argument("--memory-budget", type=float, default=None, metavar="GB",
                      help="GiB of Hessian statistics held at once; more means several calibration passes "
                           "(default: a quarter of RAM)")
    data.add_argument("--providers", default="auto",
                      help="onnxruntime execution providers, comma separated (default: CUDA if present, else CPU)")

    quant = parser.add_argument_group("quantization")
    bits = ", ".join(map(str, SUPPORTED_BITS))
    quant.add_argument("--bits", type=int, default=QUANT.bits, help=f"{bits} (default {QUANT.bits})")
    quant.add_argument("--group-size", type=int, default=QUANT.group_size,
                       help=f"columns per scale; -1 per channel (default {QUANT.group_size})")
    sym = quant.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=QUANT.sym,
                     help="symmetric grid" + (" (default)" if QUANT.sym else ""))
    sym.add_argument("--asym", dest="sym", action="store_false",
                     help="asymmetric grid" + ("" if QUANT.sym else " (default)"))
    order = quant.add_mutually_exclusive_group()
    order.add_argument("--act-order", dest="act_order", action="store_true", default=QUANT.act_order,
                       help="quantize columns by decreasing Hessian diagonal (groups stay contiguous)"
                            + (" (default)" if QUANT.act_order else ""))
    order.add_argument("--no-act-order", dest="act_order", action="store_false",
                       help="quantize columns left to right, as GPTQ without desc_act")
    quant.add_argument("--dynamic-groups", action="store_true", default=not QUANT.static_groups,
                       help="with --act-order: groups formed in activation order (writes g_idx; custom format)")
    quant.add_argument("--damp", type=_number_or_word, default=QUANT.damp, metavar="FRACTION|auto",
                       help=f"damping, fraction of mean diag(H) (default {QUANT.damp}); auto: per layer, the "
                            "value of 0.01, 0.02, 0.05, 0.1 with the lowest error on a held-out quarter of the "
                            "calibration batches (5 solves per layer)")
    quant.add_argument("--blocksize", type=int, default=QUANT.blocksize,
                       help=f"solver lazy-batch block (default {QUANT.blocksize})")
    quant.add_argument("--mse", action="store_true", default=QUANT.mse, help="search the clipping range per group")
    quant.add_argument("--algo", default=QUANT.algo.value, choices=[a.value for a in Algo],
                       help=f"solver (default {QUANT.algo.value})")
    quant.add_argument("--format", default=QUANT.format.value, choices=[f.value for f in Format],
                       help=f"default {QUANT.format.value}: MatMulNBits when it can express the result, "
                            "else our custom op")
    quant.add_argument("--accuracy-level", type=int, default=QUANT.accuracy_level,
                       help=f"accuracy_level of MatMulNBits and GptqMatMul nodes (default {QUANT.accuracy_level}: "
                            "int8 activations on CPU; 0: fp32 math; --format auto compares the ops at this level)")

    which = parser.add_argument_group("which layers")
    which.add_argument("--include", action="append", default=[], metavar="REGEX",
                       help="only quantize layers whose node, weight or torch module name matches (repeatable)")
    which.add_argument("--exclude", action="append", default=[], metavar="REGEX",
                       help="leave matching layers float (repeatable)")
    which.add_argument("--layer-config", action="append", default=[], metavar="REGEX=bits:N[,group_size:G]|FILE.json",
                       help="other bits / group size / sym for the layers REGEX matches (repeatable; later rules "
                            "win), or a JSON file mapping REGEX -> {\"bits\": 8, \"group_size\": 32}")
    which.add_argument("--quantize-head", action="store_true", default=LAYERS.quantize_head,
                       help="quantize the output head at --bits (not --head's default width)")
    which.add_argument("--head", type=_bits_or_float("--head", SUPPORTED_BITS), default=AUTO,
                       metavar="auto|float|" + "|".join(map(str, SUPPORTED_BITS)),
                       help="the output head: left float or GPTQ at these bits (default auto: 4-bit, 8-bit with "
                            "--bits 8)")
    which.add_argument("--embedding", type=_bits_or_float("--embedding", GATHER_BITS),
                       default=AUTO, metavar="auto|float|" + "|".join(map(str, GATHER_BITS)),
                       help="the token embedding table: left float or com.microsoft.GatherBlockQuantized at these "
                            "bits, round to nearest on the --group-size grid (default auto: the head's bits, at "
                            "least 4, so a tied table is stored once; float with a float head, --format qdq or a "
                            "group size it cannot take)")
    which.add_argument("--no-shared-embedding", dest="shared_embedding", action="store_false",
                       default=QUANT.shared_embedding,
                       help="store a tied embedding twice instead of reading the head's codes")

    run = parser.add_argument_group("execution")
    run.add_argument("--jobs", type=int, default=1, help="weights solved concurrently (default 1)")
    run.add_argument("--device", default=None, help="torch device for the solver (default: cuda if present, else cpu)")

    out = parser.add_argument_group("output")
    out.add_argument("--report", type=Path, help="write a per-layer JSON report here")
    out.add_argument("-v", "--verbose", action="store_true", help="say why each node was skipped; tracebacks")
    out.add_argument("-q", "--quiet", action="store_true", help="no progress bars or summary")
    return parser


def _configs(args: argparse.Namespace) -> tuple[QuantConfig, CalibConfig]:
    quant = QuantConfig(bits=args.bits, group_size=args.group_size, sym=args.sym, act_order=args.act_order,
                        static_groups=not args.dynamic_groups, damp=args.damp, blocksize=args.blocksize,
                        mse=args.mse, algo=args.algo, format=args.format, include=tuple(args.include),
                        exclude=tuple(args.exclude), quantize_head=args.quantize_head,
                        accuracy_level=args.accuracy_level, layer_rules=_layer_rules(args.layer_config),
                        head_bits=args.head, embedding_bits=args.embedding, shared_embedding=args.shared_embedding)
    calib = CalibConfig(num_samples=args.num_samples, seq_len=args.seq_len, batch_size=args.batch_size,
                        providers=_providers(args.providers), seed=args.seed, sequential=args.sequential,
                        split=args.calib_split,
                        memory_budget=None if args.memory_budget is None else int(args.memory_budget * 2**30))
    return quant, calib


def _layer_rules(specs: list[str]) -> tuple[LayerRule, ...]:
    """--layer-config values: REGEX=SETTINGS rules, or JSON files of them, in the order given."""
    import json

    rules: list[LayerRule] = []
    for spec in specs:
        if spec.endswith(".json") and "=" not in spec:
            path = Path(spec)
            try:
                data = json.loads(path.read_text())
            except OSError as exc:
                raise UserError(f"--layer-config: cannot read '{path}' ({exc.strerror or exc})") from None
            except json.JSONDecodeError as exc:
                raise UserError(f"--layer-config: '{path}' is not valid JSON ({exc})") from None
            rules.extend(LayerRule.from_mapping(data, f"'{path}'"))
        else:
            rules.append(LayerRule.parse(spec))
    return tuple(rules)


def run_quantize(args: argparse.Namespace) -> int:
    from onnx_gptq.model_folder import default_output
    from onnx_gptq.pipeline import quantize_with_report

    quant, calib = _configs(args)
    output = args.output or default_output(args.model, quant.bits)
    calibration = args.calib
    if calibration is not None and calibration != "self":
        calibration = Path(calibration)
        if not calibration.exists():
            raise UserError(f"calibration file '{calibration}' does not exist")
    if calibration is None and quant.algo is Algo.GPTQ:
        raise UserError("--calib is required for gptq (a text file with --tokenizer, .npy/.jsonl ids, "
                        "or 'self'); or use --algo rtn")
    _, report = quantize_with_report(args.model, calibration, quant, calib=calib, output=output,
                                     tokenizer=args.tokenizer, report=args.report, jobs=args.jobs,
                                     device=args.device, progress=not args.quiet)
    if args.verbose:
        for skip in report.skipped:
            print(f"skipped {skip['node']}: {skip['reason']}")
        for note in report.format_notes:
            print(note)
    if not args.quiet:
        print(report.summary())
        print(f"wrote {output}")
    return 0


def _subcommand_parser(name: str) -> tuple[argparse.ArgumentParser, object]:
    if name == "export":
        from onnx_gptq.tools import export as module
    elif name == "generate":
        from onnx_gptq.tools import generate as module
    else:
        from onnx_gptq.tools import evaluate as module
    parser = argparse.ArgumentParser(prog=f"onnx-gptq {name}")
    parser.add_argument("-v", "--verbose", action="store_true", help="tracebacks on errors")
    module.configure_parser(parser)
    return parser, module


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived. A BaseException, like KeyboardInterrupt, so that no
    `except Exception` swallows it and every `finally` (the staging directory's) runs."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated(signum)


# timeout, docker stop and CI cancels send SIGTERM; a closed terminal sends SIGHUP.
_UNWINDING_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


@contextlib.contextmanager
def _signals_unwind() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into `Terminated` while the command runs, as Python does SIGINT."""
    try:
        previous = {signum: signal.signal(signum, _raise_terminated) for signum in _UNWINDING_SIGNALS}
    except ValueError:  # not the main thread: signals cannot be handled here
        previous = {}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def _runtime_warnings_held() -> Iterator[list[tuple]]:
    """Hold back RuntimeWarnings (numpy's invalid value, overflow...) until the run ends.

    Bad input often trips them on the way to the check that reports it; printed
    first, they bury the one-line error. The caller shows them again unless a
    UserError explains them.
    """
    held: list[tuple] = []
    with warnings.catch_warnings():
        show = warnings.showwarning

        def hold(message, category, filename, lineno, file=None, line=None):  # type: ignore[no-untyped-def]
            if issubclass(category, RuntimeWarning):
                held.append((message, category, filename, lineno, file, line))
            else:
                show(message, category, filename, lineno, file, line)

        warnings.showwarning = hold
        yield held


def _dispatch(argv: list[str]) -> int:
    if argv and argv[0] in SUBCOMMANDS:
        parser, module = _subcommand_parser(argv[0])
        args = parser.parse_args(argv[1:])
        return int(module.run(args) or 0)  # type: ignore[attr-defined]
    return run_quantize(build_parser().parse_args(argv))


def _stopped(what: str) -> None:
    # A leading newline: a progress bar may be mid-line on stderr.
    print(f"\nonnx-gptq: {what}; nothing was written", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line. Returns the exit code (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "-v" in argv or "--verbose" in argv
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    held: list[tuple] = []
    try:
        with _signals_unwind(), _runtime_warnings_held() as held:
            code = _dispatch(argv)
    except UserError as exc:
        for warning in held:
            logger.info("(before the error) %s: %s", warning[1].__name__, warning[0])
        print(f"onnx-gptq: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _stopped("interrupted (SIGINT)")
        return 128 + signal.SIGINT
    except Terminated as exc:
        _stopped(f"stopped by {signal.Signals(exc.signum).name}")
        return 128 + exc.signum
    except Exception as exc:  # noqa: BLE001 - last line of defence: no traceback for users
        for warning in held:
            warnings.showwarning(*warning)
        if verbose:
            raise
        print(f"onnx-gptq: internal error: {type(exc).__name__}: {exc} (run with --verbose for a traceback)",
              file=sys.stderr)
        return 1
    for warning in held:
        warnings.showwarning(*warning)
    return code


if __name__ == "__main__":
    sys.exit(main())
