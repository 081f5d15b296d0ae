"""The kafka kind: records through librdkafka's idempotent producer (sink.py, producer.py),
the payload's mapping to a record, Debezium's outbox rows included (record.py), its flags
(spec.py) and producer configuration (config.py)."""
