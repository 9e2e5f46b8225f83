"""vlsafe."""
