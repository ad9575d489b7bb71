"""Backends that run an artifact's graphs, and the one generation loop over them."""
