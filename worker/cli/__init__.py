"""The `outbox-worker` command: arguments, run options, `run` wiring, admin commands, demo."""
