"""What a command tells its user when it cannot do its job: one line and a distinct exit code.

Every command raises a `Problem` for a misconfiguration or an unreachable dependency; the
command line prints its line (`chat-worker: <line>`) on stderr, without a traceback, and exits
with its code. The codes follow BSD's sysexits where one fits, so that scripts and
orchestrators can tell "fix the settings" from "try again later". A problem's text must never
hold a secret: build it from masked URLs only.
"""

from enum import IntEnum


class ExitCode(IntEnum):
    """The exit codes of every `chat-worker` command."""

    OK = 0
    """Done."""
    PROBLEMS = 1
    """`check` found problems, or a `dlq` command had nothing to do or was refused."""
    USAGE = 2
    """A bad flag, an invalid setting, an unknown config key, a missing Region."""
    DATA = 65
    """Input the command cannot read as events (`publish` of a line that is not JSON)."""
    NO_INPUT = 66
    """An input file that does not exist, is a directory, or cannot be read."""
    BROKER_UNAVAILABLE = 69
    """The broker cannot be reached or does not answer in time (a malformed URL too)."""
    OS_ERROR = 71
    """The machine refuses something the command needs (the HTTP port is taken)."""
    BROKER_REFUSED = 77
    """The broker answers but refuses us: wrong user or password, or no access to the vhost."""
    TOPOLOGY_CONFLICT = 78
    """The broker's topology conflicts with ours (other queue arguments, a missing plugin)."""


class Problem(Exception):
    """A condition the user must fix, told in one line (one per invalid setting); no secret."""

    exit_code: ExitCode = ExitCode.USAGE

    def __init__(self, line: str, exit_code: ExitCode | None = None) -> None:
        super().__init__(line)
        if exit_code is not None:
            self.exit_code = exit_code

    @property
    def line(self) -> str:
        """Return the line to print (several, one per problem, when the settings hold many)."""
        return str(self)
