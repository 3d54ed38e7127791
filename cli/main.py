"""``python -m facebooth`` / ``facebooth``: one argparse entry, one module per subcommand.

Each name in ``COMMAND_MODULES`` is a module of this package that exposes ``add_parser(subparsers)``; the
parser it adds sets ``func(args) -> int`` as its default. A module that does not exist (yet) is skipped, so a
half-installed or in-progress command never breaks the others. Logs go to stderr, results to stdout.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from types import ModuleType
from typing import Sequence

COMMAND_MODULES: list[str] = ["weights", "examples", "cross_init", "batch", "eval"]

log = logging.getLogger(__name__)
# The root of FaceBooth's logger tree: the top-level package ("facebooth" when installed; inside ComfyUI the name
# ComfyUI gives the pack's folder). Every module logs to logging.getLogger(__name__) below it.
PACKAGE_LOGGER = __name__.rsplit(".", 2)[0] if __name__.count(".") >= 2 else "facebooth"


def _load_command_modules(names: Sequence[str]) -> list[ModuleType]:
    modules = []
    for name in names:
        full = name if "." in name else f"{__package__}.{name}"  # dotted names are absolute (plug-ins, tests)
        try:
            module = importlib.import_module(full)
        except ModuleNotFoundError as exc:  # a missing command or a dependency it needs
            log.warning("Command %r is unavailable: %s", name, exc)
            continue
        except Exception as exc:  # a broken command must not take the whole CLI down
            log.warning("Command %r failed to load: %s: %s", name, type(exc).__name__, exc)
            continue
        if not callable(getattr(module, "add_parser", None)):
            log.warning("Command module %s has no add_parser(subparsers); skipped", full)
            continue
        modules.append(module)
    return modules


def build_parser(command_modules: Sequence[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m facebooth",
        description="FaceBooth command-line tools (ComfyUI face-identity node pack).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="more log output (stderr)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in _load_command_modules(COMMAND_MODULES if command_modules is None else command_modules):
        module.add_parser(subparsers)
    return parser


def _configure_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logger = logging.getLogger(PACKAGE_LOGGER)
    logger.setLevel(level)
    # One stderr handler of our own, bound to the current sys.stderr (tests swap it), replaced on each run.
    for handler in list(logger.handlers):
        if getattr(handler, "_facebooth_cli", False):
            logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    handler._facebooth_cli = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Logging first, so warnings about unavailable commands (raised while building the parser) are shown.
    _configure_logging(any(a in ("-v", "--verbose") for a in argv), any(a in ("-q", "--quiet") for a in argv))
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(func(args) or 0)
    except KeyboardInterrupt:
        log.error("Interrupted.")
        return 130
    except BrokenPipeError:
        # Output piped into e.g. `head` that stopped reading: end quietly, without a traceback at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
