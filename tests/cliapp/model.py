"""The application's model: one table the evolutions write to."""
import sqlalchemy as sa
import zope.sqlalchemy
from sqlalchemy import orm

DBSession = orm.scoped_session(orm.sessionmaker())
zope.sqlalchemy.register(DBSession)


class Base(orm.DeclarativeBase):
    pass


class Effect(Base):
    """One row per evolution run: what the tests count."""
    __tablename__ = 'cliapp_effects'
    id: orm.Mapped[int] = orm.mapped_column(primary_key=True, autoincrement=True)
    evolution_id: orm.Mapped[str] = orm.mapped_column(sa.String(128))


def init_model(engine):
    """Bind the session; a test application creates its table here instead of in setup-app."""
    DBSession.configure(bind=engine)
    Base.metadata.create_all(engine)
