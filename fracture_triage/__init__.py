"""Shared pieces of fracture-triage: typed settings, queue messages and the command line."""
