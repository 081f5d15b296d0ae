"""The webhook kind: signed HTTP requests (sink.py), the SSRF guard (guard.py), its flags
(spec.py)."""
