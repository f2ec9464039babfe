"""outbound: who claimed a row that is being sent

At start a hub took back every row in flight, including those another instance on the same
PostgreSQL database was sending at that moment, which could then go out twice. The owner
("host:pid:random") lets a starting hub take back only claims of dead processes of its own host.

Revision ID: 0005
Revises: 0004
"""
import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


# plain ALTER TABLE on both databases (SQLite has had DROP COLUMN since 3.35): no copy of the
# queue table, which a batch operation would make and, interrupted, leave behind


def upgrade() -> None:
    op.add_column('outbound', sa.Column('claimed_by', sqlmodel.sql.sqltypes.AutoString(),
                                        server_default='', nullable=False))


def downgrade() -> None:
    op.drop_column('outbound', 'claimed_by')
