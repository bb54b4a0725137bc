"""The data: the dataset registry and the readers of its files (IDX, CIFAR pickles) with checksums."""
