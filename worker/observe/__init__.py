"""What the relay tells operators: counters, windows, /metrics, traces, the loop watch."""
