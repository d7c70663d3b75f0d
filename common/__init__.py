"""Plumbing that the gateway and the office both use and that is not protocol: SQLite
files (WAL, durability, migrations) and the logging set-up. It imports neither side."""
