"""The HTTP API: dependency aliases, request/response schemas, and one router per resource.

Routers only read and shape data; they must never write ingest data or talk to the broker.
"""
