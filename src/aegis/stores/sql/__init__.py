"""SQL backends (SQLite, PostgreSQL) with Alembic migrations."""
