"""Durable state: SQLAlchemy 2 Core schema, repositories, engines, migrations."""
