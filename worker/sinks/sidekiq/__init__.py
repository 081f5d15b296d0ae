"""The sidekiq kind: jobs pushed to Sidekiq's Redis (sink.py), its flags (spec.py)."""
