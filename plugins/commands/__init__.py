"""Built-in commands that are clients of the public API: evaluate, export, demo."""
