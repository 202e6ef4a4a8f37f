"""Widgets of the console: header, integration cards, step rows."""
