"""Problem instances built on the public bilevel API: ``imaml``, ``hyperparameter``, ``fair``."""
