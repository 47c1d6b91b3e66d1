"""Errors the CLI turns into a message and exit code 2 (bad input), rather than a traceback."""


class UserError(Exception):
    """Bad user input: a recipe, a dataset, a model reference. The message names the thing."""
