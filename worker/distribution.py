"""The name this package is installed under, for install hints and version look-ups.

The command stays ``outbox-worker``; the distribution on PyPI is ``pg-outbox-relay`` because
``outbox-worker`` there is an unrelated project.
"""

NAME = "pg-outbox-relay"


def pip_install(*extras: str) -> str:
    """The command that installs this package with ``extras``: ``pip install 'NAME[a,b]'``."""
    return f"pip install '{NAME}[{','.join(extras)}]'" if extras else f"pip install {NAME}"
