"""Database layer: named SQL statements, prepared at start-up, one connection each."""

from .database import SCHEMA_VERSION, Database

__all__ = ["SCHEMA_VERSION", "Database"]
