"""Plumbing: errors, atomic writes, files, configuration, device choice, determinism, logging and progress."""
