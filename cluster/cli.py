"""The `braid` command line."""

from __future__ import annotations

import argparse


def build_parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog="braid",
        description=(
            "Braid serves language models that reason in parallel. "
            "The KV cache (cache_service) is in place; serving, the demo and training "
            "commands arrive with the engine, fork-join and serving milestones (see README)."
        ),
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    parser.parse_args(argv)
    parser.print_help()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
