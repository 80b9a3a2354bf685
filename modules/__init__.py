"""Action modules: each package exposes a `blueprint` built from its routes table."""
