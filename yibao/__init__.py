"""The `yibao` command line: the composition root for processes.

This package chooses concrete implementations (real drivers or `hardware_sim` simulators, SQLite or PostgreSQL) and
starts processes; it owns no business logic. Nothing else in the project may import it.
"""
