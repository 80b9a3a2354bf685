"""The machinery behind the modules: one concern a file."""
