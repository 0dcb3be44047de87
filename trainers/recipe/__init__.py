"""The schema: typed recipe sections, overrides, one-line errors."""
