"""`edgeorch predictor train|eval|predict|adapt`: argparse glue over the predictor package.

The main CLI calls `register(subparsers)`; `python -m orchestrator.predictor.cli ...` runs
the same commands standalone.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from orchestrator.predictor.errors import PredictorError


def _add_predictor_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--predictor",
        type=Path,
        default=None,
        metavar="DIR",
        help="trained or adapted predictor folder (default: the shipped model)",
    )


def _add_threads_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threads", type=int, default=1, help="onnxruntime intra-op threads (default 1)"
    )


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the `predictor` command and its subcommands to an argparse subparser set."""
    predictor = subparsers.add_parser(
        "predictor", help="train, evaluate, query and adapt the output-length predictor"
    )
    sub = predictor.add_subparsers(dest="predictor_command", metavar="COMMAND", required=True)

    train = sub.add_parser(
        "train", help="train the predictor from the vendored data (needs the train extra)"
    )
    train.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="DIR",
        help="output folder (default: models/length_predictor)",
    )
    train.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    train.add_argument(
        "--data",
        type=Path,
        default=None,
        metavar="DIR",
        help="folder of *.jsonl length files (default: models/data)",
    )
    train.add_argument(
        "--fixture",
        type=Path,
        default=None,
        metavar="FILE",
        help="also write an ONNX parity fixture here",
    )
    train.add_argument("--quiet", action="store_true", help="no progress output")
    train.set_defaults(handler=_cmd_train)

    ev = sub.add_parser("eval", help="rank quality, error and latency on a length file")
    ev.add_argument("--data", type=Path, required=True, metavar="F.jsonl")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.add_argument(
        "--model",
        default=None,
        help="served model name for every record (default: each record's model)",
    )
    ev.add_argument(
        "--latency-samples",
        type=int,
        default=1000,
        help="prompts timed one at a time (default 1000)",
    )
    _add_predictor_flag(ev)
    ev.set_defaults(handler=_cmd_eval)

    pr = sub.add_parser("predict", help="predict the output length of one prompt")
    pr.add_argument("prompt", help="the prompt text ('-' reads standard input)")
    pr.add_argument("--json", action="store_true", help="print one JSON object")
    pr.add_argument("--model", default=None, help="served model name (selects its adaptation)")
    _add_predictor_flag(pr)
    _add_threads_flag(pr)
    pr.set_defaults(handler=_cmd_predict)

    ad = sub.add_parser("adapt", help="adapt the predictor to completions in a length file")
    ad.add_argument("--data", type=Path, required=True, metavar="F.jsonl")
    ad.add_argument("--out", type=Path, required=True, metavar="DIR")
    ad.add_argument(
        "--model",
        default=None,
        help="adapt for this model name only (default: per model in the file, plus '*')",
    )
    ad.add_argument("--json", action="store_true", help="print a JSON summary")
    _add_predictor_flag(ad)
    ad.set_defaults(handler=_cmd_adapt)


def _cmd_train(args: argparse.Namespace) -> int:
    from orchestrator.predictor import train as training

    training.train(
        out_dir=args.out or training.DEFAULT_OUT_DIR,
        data_dir=args.data or training.DEFAULT_DATA_DIR,
        seed=args.seed,
        fixture_path=args.fixture,
        verbose=not args.quiet,
    )
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from orchestrator.predictor.evaluate import evaluate_file
    from orchestrator.predictor.model import LengthPredictor

    predictor = LengthPredictor.load(args.predictor, threads=1)
    result = evaluate_file(predictor, args.data, args.model, args.latency_samples)
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        for key, value in result.to_json().items():
            print(f"{key:12s} {value:.4f}" if isinstance(value, float) else f"{key:12s} {value}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from orchestrator.predictor.model import LengthPredictor

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt.strip():
        raise PredictorError("prompt is empty")
    predictor = LengthPredictor.load(args.predictor, threads=args.threads)
    pred = predictor.predict(prompt, args.model)
    out = {"expected_tokens": round(pred.expected_tokens, 2)}
    for level, value in sorted(pred.quantiles.items()):
        out[f"p{round(level * 100):d}"] = round(value, 2)
    if args.json:
        print(json.dumps(out))
    else:
        print(" ".join(f"{k}={v}" for k, v in out.items()))
    return 0


def _cmd_adapt(args: argparse.Namespace) -> int:
    from orchestrator.predictor.adapt import adapt_from_file

    summary = adapt_from_file(args.data, args.out, base=args.predictor, model=args.model)
    if args.json:
        print(json.dumps(summary))
    else:
        for name, info in summary["calibrations"].items():
            print(f"{name or '(no model)'}: {info}")
        print(f"wrote {args.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry: `python -m orchestrator.predictor.cli predictor ...` or without
    the leading `predictor`."""
    parser = argparse.ArgumentParser(prog="edgeorch")
    subparsers = parser.add_subparsers(dest="command", required=True)
    register(subparsers)
    args_list = list(sys.argv[1:] if argv is None else argv)
    if not args_list or args_list[0] != "predictor":
        args_list.insert(0, "predictor")
    args = parser.parse_args(args_list)
    try:
        return int(args.handler(args))
    except PredictorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
