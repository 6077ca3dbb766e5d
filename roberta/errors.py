"""One exception type for every mistake a user can make.

Each message is one line that names the problem and the fix; the CLI prints it as
`error: <message>` and exits with status 2, so nobody sees a traceback for bad input.
"""


class RobertaError(Exception):
    """Bad input: a wrong path, a file that is not what it claims, a shape that does not fit."""


class InputError(RobertaError):
    """One input of several that the library refuses (too long, no <mask>, an empty context), as opposed
    to a call it cannot make at all (a wrong model, a bad option): the CLI names the line it came from."""


class RobertaWarning(UserWarning):
    """A result that is legal but probably not meant: a head initialised at random, NaN weights, a smaller
    vocabulary than asked. The CLI prints it as one `warning: ...` line on stderr."""
