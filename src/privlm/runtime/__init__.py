"""Runtimes: thin adapters that move data and call ``privlm.federated``."""
