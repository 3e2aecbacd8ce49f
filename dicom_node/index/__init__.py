"""The index: SQLAlchemy 2.0 typed ORM over SQLite (default) or PostgreSQL, Alembic migrations."""
