"""Command line: ``python -m sarco_app <command> ...``.

Each module in :mod:`sarco_app.commands` defines one sub-command with two functions,
``add_parser(subparsers)`` (registers the command and its options, returns its parser) and
``run(args) -> int`` (the exit status). Input errors are raised as
:class:`sarco_app.errors.SarcoError` (or ``ValueError`` / ``OSError``) and printed on one line.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys

from sarco_app import __version__, commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sarco_app",
        description="Body-composition labelling and sarcopenia measurement on abdominal CT.",
    )
    parser.add_argument("--version", action="version", version=f"sarco {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        command_parser = module.add_parser(sub)
        command_parser.set_defaults(_run=module.run)
    return parser


class _StderrWarnings(logging.Handler):
    """The library logs; the CLI shows its warnings as ``warning: ...`` lines on the stderr of
    the moment (tests swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        print(f"{record.levelname.lower()}: {record.getMessage()}", file=sys.stderr)


def _show_library_warnings() -> None:
    logger = logging.getLogger("sarco_app")
    if not any(isinstance(h, _StderrWarnings) for h in logger.handlers):
        logger.addHandler(_StderrWarnings(level=logging.WARNING))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _show_library_warnings()
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, OSError) as exc:
        # One line, no traceback: the message names what is wrong with the input.
        print(f"error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 1)


if __name__ == "__main__":
    sys.exit(main())
