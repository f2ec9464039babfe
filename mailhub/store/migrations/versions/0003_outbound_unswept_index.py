"""outbound: the payload sweep's index holds only rows that still have a payload

The sweep used to walk finished rows from a position kept in memory, so after a restart it
walked the whole history once, and a row that ended with an earlier timestamp than the position
(another instance's clock) was never swept. With a partial index on the rows that still hold a
payload it needs no position: it takes the oldest of them, and swept rows leave the index.

Revision ID: 0003
Revises: 0002
"""
import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None

_WHERE = sa.text('payload_id IS NOT NULL')


def upgrade() -> None:
    with op.batch_alter_table('outbound', schema=None) as batch_op:
        batch_op.drop_index('ix_outbound_finished')
        batch_op.create_index('ix_outbound_unswept', ['status', 'updated_at', 'id'], unique=False,
                              sqlite_where=_WHERE, postgresql_where=_WHERE)


def downgrade() -> None:
    with op.batch_alter_table('outbound', schema=None) as batch_op:
        batch_op.drop_index('ix_outbound_unswept')
        batch_op.create_index('ix_outbound_finished', ['status', 'updated_at'], unique=False)
