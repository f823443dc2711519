"""The engine: the layer loop, activation storage, device placement, model loading and
streaming. Plugins never import it (an import-linter contract); they work through
:mod:`qcore.context` and the other contracts."""
