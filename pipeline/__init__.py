"""Distillery's spine: config schema, run directory and manifest, stage order, CLI, console output."""
