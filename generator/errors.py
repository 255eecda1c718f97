"""Errors meant for users: the CLI prints their message without a traceback and exits with code 2."""


class GenRepoError(Exception):
    """A problem the user can fix: bad input, a missing file, an unsupported setting."""


class ConfigError(GenRepoError):
    """A checkpoint or build setting that gen-repo cannot honour; the message names the field."""
