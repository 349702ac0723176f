"""The one exception type for bad user input.

Raised at the boundary (a config field, a file, a model) with a message that says
what was wrong and how to fix it. The CLI prints it as a single line and exits
non-zero; library users catch it like any other exception. The core assumes valid
input and raises ordinary exceptions for programming errors.
"""


class EvosearchError(Exception):
    """Bad input: the message names the field or file and the fix, on one line."""


def first_problem(exc) -> str:
    """``field: what is wrong`` of a pydantic ``ValidationError``, for a one-line message.

    An unknown field comes first: a typo'd key (``budgt``) also leaves the field it was meant
    to be missing, and the typo is what to fix."""
    errors = exc.errors()
    error = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    where = ".".join(str(p) for p in error["loc"])
    what = "unknown field" if error["type"] == "extra_forbidden" else error["msg"]
    return f"{where}: {what}" if where else what
