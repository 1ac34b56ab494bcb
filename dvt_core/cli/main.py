"""The ``dvt`` command line (also ``python -m dvt_core``).

The parser is built from the subcommand modules listed in :data:`dvt_core.cli.commands.COMMANDS`. A user
error (missing file, unreadable image, unknown model, bad budget, ...) exits with status 2 and one line
on stderr; an internal error keeps its traceback.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import sys
from typing import Optional, Sequence

EXIT_USER_ERROR = 2
# errno values of OSErrors a user causes or fixes (space, quota, permissions, names); others keep their traceback
USER_ERRNOS = {getattr(errno, n) for n in ("ENOSPC", "EDQUOT", "EROFS", "EFBIG", "EACCES", "EPERM", "ENAMETOOLONG",
                                           "ELOOP", "ENOTDIR", "EISDIR", "EEXIST", "ENOENT", "EMLINK", "EXDEV", "ENXIO",
                                           "ETXTBSY", "EMFILE", "ENFILE") if hasattr(errno, n)}


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in --help, except where there is none to show (None, off) or the help says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text or not action.option_strings:
            return text
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, status 2, no usage dump
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(EXIT_USER_ERROR)


def command_module(name: str):
    return importlib.import_module(f"dvt_core.cli.commands.{name}")


def build_parser() -> argparse.ArgumentParser:
    from dvt_core import __version__
    from dvt_core.cli.commands import COMMANDS

    parser = _Parser(prog="dvt", description="Dynamic Vision Transformer: adaptive token grids with early exit.")
    parser.add_argument("--version", action="version", version=f"dvt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name in COMMANDS:
        module = command_module(name)
        module.add_arguments(sub.add_parser(name, help=module.HELP, description=module.HELP, formatter_class=_Help))
    return parser


def _note(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning from any library, shown as the CLI shows every note: one escaped ``# note:`` line, no source line."""
    from dvt_core.cli.commands._shared import escape_text

    text = " ".join(str(message).split()) or category.__name__
    sys.stderr.write(f"# note: {escape_text(text)}\n")


def _quiet_broken_pipe() -> int:
    """stdout was closed early (``dvt flops --list | head -1``): stop quietly, as other Unix tools do. stdout is
    pointed at /dev/null so the interpreter's last flush at exit cannot fail again."""
    import os

    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    import warnings

    with warnings.catch_warnings():
        warnings.showwarning = _note
        return _run(argv)


def _run(argv: Optional[Sequence[str]]) -> int:
    from dvt_core.cli.commands._shared import escape_text
    from dvt_core.errors import DVTError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status = int(command_module(args.command).run(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, inside the handlers, not at the interpreter's exit
        return status
    except BrokenPipeError:  # before OSError, which it is
        return _quiet_broken_pipe()
    except (DVTError, FileExistsError, FileNotFoundError, IsADirectoryError,
            PermissionError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if isinstance(exc, (FileNotFoundError, IsADirectoryError, PermissionError)) and exc.filename:
            msg = f"{exc.strerror or 'cannot open'}: {exc.filename}"
        sys.stderr.write(f"dvt {args.command}: error: {escape_text(msg)}\n")
        return EXIT_USER_ERROR
    except OSError as exc:  # the disk full, a read-only or foreign folder: the user's to fix, one line
        if exc.errno not in USER_ERRNOS:
            raise
        where = f": {exc.filename}" if exc.filename else ""
        sys.stderr.write(f"dvt {args.command}: error: {escape_text(f'{exc.strerror or exc}{where}')}\n")
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
