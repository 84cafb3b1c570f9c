"""Checkpoints: where they live and which to resume from (layout.py), exact-resume state (resume.py)."""
