"""Add pages.slug, filled by a data evolution that depends on this upgrade.

Revision ID: slug_0002
Revises: pages_0001
"""
import sqlalchemy as sa
from alembic import op

revision = 'slug_0002'
down_revision = 'pages_0001'
branch_labels = None
depends_on = None


def upgrade():
    op.add_column('pages', sa.Column('slug', sa.String(100), nullable=True))
    op.execute("INSERT INTO upgrade_log (step) VALUES ('slug_0002')")


def downgrade():
    op.execute("DELETE FROM upgrade_log WHERE step = 'slug_0002'")
    op.drop_column('pages', 'slug')
