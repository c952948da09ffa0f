"""Create the pages table.

Revision ID: pages_0001
Revises:
"""
import sqlalchemy as sa
from alembic import op

revision = 'pages_0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade():
    op.create_table('pages',
                    sa.Column('id', sa.Integer, primary_key=True),
                    sa.Column('title', sa.String(100), nullable=False))
    # One row per step that ran (revision or data evolution): one run twice shows twice.
    op.create_table('upgrade_log', sa.Column('step', sa.String(32), nullable=False))
    op.execute("INSERT INTO upgrade_log (step) VALUES ('pages_0001')")


def downgrade():
    op.drop_table('upgrade_log')
    op.drop_table('pages')
