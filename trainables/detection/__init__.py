"""Detection: trigger-agnostic statistics, the field's baselines and the per-sample scores of filtering
defences, registries over a typed context."""
