"""The one error path for users.

A UserError is something the person running a command can fix: its message says what is wrong and
what to do. `run_main` ends a stage or `gan` command that raises one with that message on stderr and
exit status 1, without a traceback; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class UserError(Exception):
    """A bad input, a missing prerequisite or an unreachable service; the message names the fix."""


def run_main(main: Callable[[], object], program: str) -> None:
    """Run a command's main(); a UserError becomes `program: error: message` on stderr and exit 1."""
    try:
        main()
    except UserError as error:
        print(f"{program}: error: {error}", file=sys.stderr, flush=True)
        sys.exit(1)
