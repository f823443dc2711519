"""Example third-party qcore plugin."""
