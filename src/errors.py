"""The project's base error: something the user can fix, shown as one clear line without a traceback."""


class UserError(Exception):
    """Bad input, missing data, an unreachable service: the message names the thing and what to do."""
