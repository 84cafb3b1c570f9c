"""Checkpoints: exact-resume state (resume.py)."""
