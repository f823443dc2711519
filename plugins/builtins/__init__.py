"""Built-in architecture adapters, datasets, evaluators and the qcore save format."""
