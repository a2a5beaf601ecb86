"""One module per pipeline stage; runner.py imports them by name and knows their order."""
