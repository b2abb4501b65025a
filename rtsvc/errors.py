"""The one exception type for user mistakes.

Anything a user can cause (a missing file, a wrong checkpoint, an unknown speaker) raises
`UserError`; the CLI prints its message on one line and exits with code 2. Programming errors
stay ordinary exceptions so they keep their tracebacks.
"""


class UserError(Exception):
    """A problem the user can fix; `str(err)` is the whole message shown to them."""
