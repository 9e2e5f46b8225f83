"""Safety tuning data: align data, composed refusals, leakage checks, a VLGuard-like set, on-policy pairs."""
