"""One exception type for every mistake a user can make.

Each message is one line that names the problem and the fix; the CLI prints it as
`error: <message>` and exits with status 2, so nobody sees a traceback for bad input.
"""


class RobertaError(Exception):
    """Bad input: a wrong path, a file that is not what it claims, a shape that does not fit."""
