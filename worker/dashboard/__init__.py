"""The live terminal dashboard, and the summary line logged without a terminal."""
