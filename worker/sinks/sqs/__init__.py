"""The sqs kind: Amazon SQS batches (sink.py, message.py), its flags (spec.py)."""
