"""Hyperparameter optimization by implicit differentiation."""
