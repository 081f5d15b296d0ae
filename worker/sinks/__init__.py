"""Delivery sinks: one per intent kind."""
