"""Alembic migration scripts of the sync server (run through `sync_server.db.migrate`, no alembic.ini needed)."""
