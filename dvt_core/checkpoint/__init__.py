"""Checkpoint files: formats read and written, the rename tables, conversion, shipped weights, --init transfer."""
