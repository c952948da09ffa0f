"""Alembic environment of the test script directory, written as Alembic documents for sharing
a connection: the upgrade runs on ``config.attributes['connection']`` when the caller (here
tgext.evolve's AlembicUpgrade) hands one over, else on an engine of its own."""
from alembic import context
from sqlalchemy import create_engine

config = context.config


def run_migrations(connection):
    # As a quickstarted TurboGears app does: its own version table name.
    context.configure(connection=connection, target_metadata=None,
                      version_table='migrate_version')
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get('connection')
if connection is None:
    engine = create_engine(config.get_main_option('sqlalchemy.url'))
    with engine.connect() as connection:
        run_migrations(connection)
    engine.dispose()
else:
    run_migrations(connection)
