"""Alembic environment: runs on the connection storage.migrate hands in."""

from alembic import context

from storage.schema import metadata

config = context.config
connection = config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
