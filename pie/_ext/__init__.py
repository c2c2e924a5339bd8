"""Compiled modules (private). Import them through the Python modules that re-export them."""
