"""The attack: backdoor triggers (a registry) and poisoning the training set."""
