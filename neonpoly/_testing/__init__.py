"""Test doubles shipped with the source for the test suite (never imported by the product)."""
