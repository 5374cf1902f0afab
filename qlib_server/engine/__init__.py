"""Qlib's expression language evaluated over many instruments at once, with Qlib's values."""
