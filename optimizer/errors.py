"""The one exception type for mistakes a user can make and fix."""


class UserError(Exception):
    """A problem with the user's input: the message names it and says how to fix it.

    The CLI prints it as one line and exits non-zero, without a traceback.
    """
