"""Queue side of the node: Celery app factory, tasks, enqueuer, sweeper and the SR.

Importing this package builds nothing (no Celery app, no connection, no model); it makes
pydicom's concept dictionary lazy (:func:`worker.standard_tables.install_concepts`).
"""

from worker import standard_tables

# Before anything imports pydicom.sr: every process of the role (the pool child builds the
# SR and the evidence captures) reads pydicom's 15 MB concept dictionary one keyword at a time.
standard_tables.install_concepts()
