"""User-facing errors: anything a user can fix (flags, files, config, data)."""


class UserError(ValueError):
    """A problem the user can fix. The CLI prints its message on one line and exits 2."""


class DataError(UserError):
    """Missing or malformed dataset files."""
