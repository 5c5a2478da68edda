"""Queue side of the node: Celery app factory, tasks, enqueuer, sweeper and the SR.

Importing this package builds nothing (no Celery app, no connection, no model).
"""
