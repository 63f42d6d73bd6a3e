"""The errors the command line shows as one message, without a traceback.

A traceback is for a bug in breastnet; for wrong input, settings or stage order the message
must say what to change, and a traceback around it only hides it.
"""


class UserError(Exception):
    """The input data, the settings or the order of stages are wrong; the message says how."""


class ConfigError(UserError, ValueError):
    """A setting that cannot work (an unknown stage, a missing input path...)."""


def unwrap(error: BaseException) -> BaseException:
    """The error a constructor raised, out of Hydra's ``InstantiationException`` around it (a
    missing weights file found while ``instantiate`` builds the patch model)."""
    while type(error).__name__ == "InstantiationException" and error.__cause__ is not None:
        error = error.__cause__
    return error


def is_user_error(error: BaseException) -> bool:
    """Whether ``error`` is the user's to fix, so its message alone is shown.

    A ``FileNotFoundError`` raised by breastnet with a message (``errno`` unset: "... run the
    features stage first") counts; one raised by the OS (``errno`` set) may be a bug and
    keeps its traceback.
    """
    error = unwrap(error)
    return isinstance(error, UserError) or (
        isinstance(error, FileNotFoundError) and error.errno is None
    )
