"""yibao package."""
