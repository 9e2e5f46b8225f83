"""Layer analysis: where training moved the weights (weights.py), where safety lives in the activations
(activations.py), and merge configs built from either (merges.py). Output schema: ANALYSIS.md."""
