"""Screens and drawers of the console."""
