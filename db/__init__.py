"""Persistence: typed SQLAlchemy 2.0 models, sessions and the operations the roles share."""
