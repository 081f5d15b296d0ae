"""The reference pages of the documentation site, generated from the code so that they cannot
drift from it: docs/reference/cli.md (the argument parser), metrics.md (the declared /metrics
families), sql.md (the catalog of a freshly migrated schema, and schema.sql).

    python -m tests.docs_reference    # writes the three pages

tests/test_docs_reference.py generates them again and fails when a committed page differs.
"""
