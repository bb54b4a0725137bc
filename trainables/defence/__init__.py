"""Defences a trainer applies: the input-gradient penalty (a registry of conventions)."""
