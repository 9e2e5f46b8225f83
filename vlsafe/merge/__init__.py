"""Weight merging: pure methods (methods.py), mergekit-style configs (config.py), a streaming engine (engine.py)."""
