"""Errors a user can cause, kept apart from bugs so the CLI can answer them in one line."""


class UserError(Exception):
    """A mistake in the user's own input (recipe, data, paths). The CLI prints ``str(err)`` on one line and exits 2."""
