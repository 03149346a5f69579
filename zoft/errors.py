"""The one exception type whose message is shown to the user as a single line (no traceback)."""


class ZoftError(Exception):
    """A user-facing error: bad recipe, missing file, malformed row, impossible combination.

    The CLI prints ``zoft: error: <message>`` and exits with status 2. The message names the
    problem and the fix.
    """


class RecipeError(ZoftError):
    """One or more recipe problems; ``lines`` holds one line per problem (key path: what was expected)."""

    def __init__(self, lines: list[str]):
        self.lines = list(lines)
        super().__init__("\n".join(self.lines))


class DataError(ZoftError):
    """A data file that cannot be used: missing file, missing column, malformed row (names file and row)."""
