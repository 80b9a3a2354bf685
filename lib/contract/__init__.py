"""What modules declare, and everything derived from it: the action records and their registry,
and the contract documents (OpenAPI)."""
