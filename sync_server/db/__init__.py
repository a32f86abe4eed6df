"""Persistence of the sync server: ORM models, engine and session factory, schema migrations.

This package owns the database schema and how connections are made. It must never know about MQTT or HTTP.
"""
