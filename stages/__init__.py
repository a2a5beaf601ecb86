"""One module per pipeline stage; pipeline/runner.py imports them by name and knows their order."""
