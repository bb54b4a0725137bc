"""Training one trial: the visible training loop, its recipe, the input-gradient penalty, the result."""
