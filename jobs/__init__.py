"""Thin entry points: each parses a config, calls one library function, and tears down."""
