"""The `braid` command line."""

from __future__ import annotations

import argparse

TASKS = ("countdown",)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="braid",
        description="Braid serves language models that reason in parallel.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    train = commands.add_parser(
        "train", add_help=False, help="train the embedded model of a task (python -m countdown.train)"
    )
    train.add_argument("task", choices=TASKS)
    evaluate = commands.add_parser(
        "eval", add_help=False, help="evaluate a model on a task through Braid (python -m countdown.evaluate)"
    )
    evaluate.add_argument("task", choices=TASKS)
    commands.add_parser("serve", add_help=False, help="serve over HTTP, OpenAI API (python -m cluster.serve)")
    commands.add_parser("demo", add_help=False, help="a minute with Braid: live thread trees (python -m cluster.demo)")
    commands.add_parser("trace", add_help=False, help="a request's thread timeline (python -m cluster.timeline)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "train":
        from countdown.train import main as train

        train(rest)
    elif args.command == "eval":
        from countdown.evaluate import main as evaluate

        evaluate(rest)
    elif args.command == "serve":
        from cluster.serve import main as serve

        serve(rest)
    elif args.command == "demo":
        from cluster.demo import main as demo

        demo(rest)
    elif args.command == "trace":
        from cluster.timeline import main as trace

        trace(rest)
    else:
        parser.print_help()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
