"""The ``email`` kind: deliver an intent as one SMTP message over pooled connections.

Three layers, each testable alone:

* ``parse_smtp_url`` turns the operator's URL into a ``SmtpConfig`` (``ConfigError`` if bad);
* ``build_message`` turns a payload into message bytes and the envelope, a pure function
  that raises ``PermanentError`` for anything that could not be sent safely;
* ``EmailSink`` keeps a small pool of connected clients and maps SMTP outcomes to
  ``TransientError`` / ``PermanentError``.

``spec.py`` declares the kind and its flags to the registry (worker/sinks/registry.py).
"""

from worker.sinks.email.config import SmtpConfig, TlsMode, parse_smtp_url
from worker.sinks.email.message import build_message
from worker.sinks.email.sink import EmailSink, classify_smtp_error

__all__ = [
    "EmailSink",
    "SmtpConfig",
    "TlsMode",
    "build_message",
    "classify_smtp_error",
    "parse_smtp_url",
]
