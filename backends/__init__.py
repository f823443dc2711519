"""Execution backends shipped with qcore, each a plugin of its own."""
