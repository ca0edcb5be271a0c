"""Experiment toolkit: CIFAR data, the paper's models, trainer, sweeps, reports and CLI.

The library (``curvreg``) never imports this package.
"""
