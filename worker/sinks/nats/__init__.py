"""The nats kind: JetStream publish with PubAcks (sink.py), its flags (spec.py)."""
