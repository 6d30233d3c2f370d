"""Command line: ``python -m sarco_app <command> ...``.

Each module in :mod:`sarco_app.commands` defines one sub-command with two functions,
``add_parser(subparsers)`` (registers the command and its options, returns its parser) and
``run(args) -> int`` (the exit status). Input errors are raised as
:class:`sarco_app.errors.SarcoError` (or ``ValueError`` / ``OSError``) and printed on one line.
A module may name its file options in ``INPUTS`` and ``OUTPUTS`` ('--json', or a positional's name): an
output that would overwrite an input, another output or a stored final label is refused before
the command runs (:func:`refuse_overwrites`), and ``OUTPUT_SUFFIXES`` ({option: suffixes}) names
the file types an output option can write.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import pkgutil
import sys
from pathlib import Path

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
        suffixes = getattr(module, "OUTPUT_SUFFIXES", {})
        command_parser.set_defaults(_run=module.run,
                                    _inputs=_dests(command_parser, getattr(module, "INPUTS", ())),
                                    _outputs=_dests(command_parser, getattr(module, "OUTPUTS", ())),
                                    _suffixes=dict(zip(_dests(command_parser, suffixes), suffixes.values())))
    return parser


def _dests(parser: argparse.ArgumentParser, options) -> tuple[tuple[str, str], ...]:
    """(option as the user types it, argparse dest) of each named option ('--json', or a
    positional's name); a name the parser lacks is a programming error."""
    found = []
    for option in options:
        action = next((a for a in parser._actions if option in a.option_strings or a.dest == option), None)
        if action is None:
            raise KeyError(f"{parser.prog}: no option {option!r}")
        found.append((option, action.dest))
    return tuple(found)


#: File types an output may not replace inside an input folder (images, labels, checkpoints).
_DATA_SUFFIXES = (".nii", ".nii.gz", ".dcm", ".pt", ".nrrd", ".mha")


def _paths(value) -> list[Path]:
    if value is None or value == "":
        return []
    return [Path(v) for v in value] if isinstance(value, (list, tuple)) else [Path(value)]


def _same(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def refuse_overwrites(args: argparse.Namespace) -> None:
    """Raise :class:`SarcoError` when an output option names an input file, the same file as
    another output, an existing image/label/checkpoint inside an input folder, or a stored final
    label (``labels/final/``): the command would destroy what it reads or an annotator's work."""
    from sarco_app.errors import SarcoError

    inputs = [(name, path) for name, dest in args._inputs for path in _paths(getattr(args, dest, None))]
    outputs = [(name, path) for name, dest in args._outputs for path in _paths(getattr(args, dest, None))]
    problems = []
    for i, (name, out) in enumerate(outputs):
        for in_name, source in inputs:
            if _same(out, source):
                problems.append(f"{name} {out} is the input {in_name} {source}")
            elif (source.is_dir() and out.is_file() and out.name.lower().endswith(_DATA_SUFFIXES)
                  and source.resolve() in out.resolve().parents):
                problems.append(f"{name} {out} lies inside the input {in_name} {source}")
        for other_name, other in outputs[i + 1:]:
            if _same(out, other):
                problems.append(f"{name} and {other_name} name the same file {out}")
        if out.is_file() and out.parent.name == "final" and out.parent.parent.name == "labels":
            problems.append(f"{name} {out} is a stored final label")
    if problems:
        raise SarcoError("refusing to overwrite: " + "; ".join(problems) + " (choose another output path)")
    for (name, dest), allowed in args._suffixes.items():
        for out in _paths(getattr(args, dest, None)):
            if not out.name.lower().endswith(allowed):
                raise SarcoError(f"{name} {out}: the file name must end in {' or '.join(allowed)}")


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
        refuse_overwrites(args)
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
