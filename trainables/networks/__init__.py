"""The networks: the model registry and the architectures."""
