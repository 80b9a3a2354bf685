"""Who calls and what they may call: Bearer tokens (opaque or JWT), callers and their scopes."""
