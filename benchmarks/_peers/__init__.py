"""Peer implementations of the iMAML meta-gradient, one module per library."""
