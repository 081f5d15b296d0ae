"""The relay core: claim, deliver, record. The data flow is drawn in core.py."""
