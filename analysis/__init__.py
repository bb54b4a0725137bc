"""Analysis of sweeps: tidy results, Pareto frontiers, figures and the paper's closed forms."""
