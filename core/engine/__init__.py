"""The engine: the layer loop, activation storage, device placement, model loading and
streaming. Plugins never import it (an import-linter contract): they use the contracts."""
