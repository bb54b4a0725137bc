"""Detection: trigger-agnostic statistics and the field's baselines, registries over a typed context."""
