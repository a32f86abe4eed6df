"""Ordered schema revisions; each must leave the database equal to the ORM metadata at that point."""
