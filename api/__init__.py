"""A small read-only HTTP query API over the results database (``fracture-triage api``)."""
