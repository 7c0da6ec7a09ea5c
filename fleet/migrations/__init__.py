"""Alembic migration scripts of the fleet database (run by :mod:`fleet.migrate`)."""
