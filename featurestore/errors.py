"""The one exception type for bad input; :func:`featurestore.cliutil.run_cli` prints it as one line.

It lives apart from ``cliutil`` so that the workspace layout (which ``cliutil``
imports) can raise it too.
"""


class UserError(Exception):
    """A problem with the user's input or environment; the message names the fix."""
