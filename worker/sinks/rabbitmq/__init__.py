"""The rabbitmq kind: AMQP publish with confirms (sink.py), its flags (spec.py)."""
