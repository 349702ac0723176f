"""The one exception type for bad user input.

Raised at the boundary (a config field, a file, a model) with a message that says
what was wrong and how to fix it. The CLI prints it as a single line and exits
non-zero; library users catch it like any other exception. The core assumes valid
input and raises ordinary exceptions for programming errors.
"""


class EvosearchError(Exception):
    """Bad input: the message names the field or file and the fix, on one line."""
