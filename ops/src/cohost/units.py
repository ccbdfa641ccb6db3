"""Byte units, in one place."""

MIB = 1 << 20
GIB = 1 << 30
