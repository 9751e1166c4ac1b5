"""User-facing errors: anything a user can fix (flags, files, config, data)."""


def one_line(text: str) -> str:
    """``text`` with every control character written as an escape (``\\n``, ``\\x1b``), so
    a message that quotes a user's key, path or value stays on one line and cannot move
    the terminal's cursor."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class UserError(ValueError):
    """A problem the user can fix. The CLI prints its message on one line and exits 2.

    The message is kept to one line whatever the user's input held (a config key with a
    newline in it, say): control characters are shown escaped."""

    def __str__(self) -> str:
        return one_line(super().__str__())


class DataError(UserError):
    """Missing or malformed dataset files."""
