"""The ``sweeper`` command line: a thin Typer layer over the library.

Every command is a plain function usable from Python. Bad input of any kind (a flag, a
config file, a dataset file, a checkpoint) ends in one line on stderr and exit code 2,
before any training starts; :func:`main` is the only place that catches.
"""

from __future__ import annotations

import re
import sys

import typer

from . import readers, sweeps, trial  # noqa: F401 - each module registers its commands on `app`
from .options import (
    Interrupted,
    SweeperError,
    SweepFailed,
    _click_exc,
    _refresh_help,
    app,
    load_plugins,
)


def _given_value(argv: list[str], param) -> str:
    """`` (got 'abc')`` for the option a parse error is about, so the message names the value."""
    for opt in getattr(param, "opts", None) or ():
        for i, tok in enumerate(argv):
            if tok == opt and i + 1 < len(argv):
                return f" (got {argv[i + 1]!r})"
            if tok.startswith(opt + "="):
                return f" (got {tok.split('=', 1)[1]!r})"
    return ""


_REASONS = (  # the parser's (pydantic-style) reasons, in the project's words
    (re.compile(r"Input should be a valid number.*"), "expected a number"),
    (re.compile(r"Input should be a valid integer.*"), "expected a whole number"),
    (re.compile(r"Input should be a valid boolean.*"), "expected true or false"),
    (re.compile(r"Value error, '.*' is not one of (.*)\.$"), r"must be one of \1"),
    (re.compile(r"Input should be greater than or equal to (\S+?)\.?$"), r"must be >= \1"),
    (re.compile(r"Input should be less than or equal to (\S+?)\.?$"), r"must be <= \1"),
)


def _bad_value(msg: str, given: str) -> str:
    """``Invalid value for '--theta': Input should be a valid number...`` as ``--theta='abc' is invalid: expected
    a number``; empty when the message is not about one option's value."""
    m = re.match(r"Invalid value for '(--[\w-]+)'(?: / '--[\w-]+')?: (.*)", msg)
    if not m or not given:
        return ""
    reason = m.group(2)
    for pattern, words in _REASONS:
        reason = pattern.sub(words, reason)
    reason = re.sub(r"\s*\(got .*\)$", "", reason)
    return f"{m.group(1)}={given.removeprefix(' (got ').removesuffix(')')} is invalid: {reason}"


def _set_hint(e, argv: list[str]) -> str:
    """For ``--lr 0.01`` on a command without that flag: say that ``--set lr=0.01`` reaches the field."""
    opt = getattr(e, "option_name", None)
    if not isinstance(e, _click_exc.NoSuchOption) or not opt or not opt.startswith("--"):
        return ""
    from trainables import TRIAL_KINDS
    from trainables.fields import specs

    field = opt[2:].split("=", 1)[0].replace("-", "_")
    if not any(field in specs(k.config()) for k in TRIAL_KINDS.values()):
        return ""
    value = next((argv[i + 1] for i, t in enumerate(argv[:-1]) if t == opt), None)
    value = opt.split("=", 1)[1] if "=" in opt else value
    return f"; {field} is a trial field: use --set {field}={value if value is not None else 'VALUE'}"


def _one_line(msg: str) -> str:
    return " ".join(msg.split())


def keep_interrupts() -> None:
    """Ctrl-C is never lost: a KeyboardInterrupt raised while Python runs a garbage-collection callback or a
    ``__del__`` cannot propagate (Python prints "Exception ignored in ..." and carries on: a `report` stopped
    that way went on to the end and exited 0). It is raised again in the main thread 50 ms later, from a timer
    thread: raised from the hook itself, it would land in the hook (and be ignored again)."""
    import _thread
    import threading

    if getattr(sys.unraisablehook, "keeps_interrupts", False):
        return
    default = sys.unraisablehook

    def hook(unraisable) -> None:
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            timer = threading.Timer(0.05, _thread.interrupt_main)  # once the hook and the collection are done
            timer.daemon = True
            timer.start()
        else:
            default(unraisable)

    hook.keeps_interrupts = True
    sys.unraisablehook = hook


def main(argv: list[str] | None = None) -> int:
    """Console entry point: one-line errors and exit code 2 for any bad input."""
    argv = list(sys.argv[1:] if argv is None else argv)
    from .. import logs

    keep_interrupts()
    logs.capture()  # library records to a log file; the terminal keeps the project's lines
    try:
        load_plugins()  # a plugin that fails to import is a SweeperError: one line, exit 2
        trial.declare_options()  # the fields a plugin declared become `trial` options too
        _refresh_help()
        rc = app(args=argv, standalone_mode=False)
    except _click_exc.NoArgsIsHelpError:
        return 2  # help was printed
    except _click_exc.UsageError as e:
        where = f" (sweeper {e.ctx.info_name})" if e.ctx is not None and e.ctx.info_name != "sweeper" else ""
        given = _given_value(argv, getattr(e, "param", None))
        msg = _one_line(e.format_message()).replace(" (Possible options: --help)", "")  # click's non-suggestion
        uniform = _bad_value(msg, given)
        if uniform:  # the wording of every other bad value: --flag='x' is invalid: expected ...
            typer.echo(f"sweeper: error{where}: {uniform}", err=True)
            return 2
        typer.echo(f"sweeper: error{where}: {msg}{given}{_set_hint(e, argv)}", err=True)
        return 2
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("sweeper: interrupted", err=True)
        return 130
    except Interrupted as e:
        typer.echo(f"sweeper: {e}", err=True)
        return 130
    except SweepFailed as e:
        typer.echo(f"sweeper: {e}", err=True)
        return 1
    except (typer.Exit, _click_exc.ClickException) as e:
        return getattr(e, "exit_code", 1)
    except SweeperError as e:
        typer.echo(f"sweeper: error: {_one_line(str(e))}", err=True)
        return 2
    if rc == 130:  # Typer turns Ctrl-C inside a command into a returned 130, not an exception
        typer.echo("sweeper: interrupted", err=True)
        return 130
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
