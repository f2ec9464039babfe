"""payloads: large sealed payloads may lie in segment files beside an SQLite database

A 270 KB payload written into SQLite is copied into the write-ahead log, out of it and into the
database file; appended to a file it is copied once. A row whose bytes lie in a file keeps
``sealed`` empty and names the segment, offset and length; the partial index tells the sweep
which segments are still named.

Revision ID: 0004
Revises: 0003
"""
import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None

_WHERE = sa.text('segment IS NOT NULL')


def upgrade() -> None:
    with op.batch_alter_table('payloads', schema=None) as batch_op:
        batch_op.add_column(sa.Column('segment', sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column('seg_offset', sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column('seg_length', sa.Integer(), nullable=True))
        batch_op.create_index('ix_payloads_segment', ['segment'], unique=False,
                              sqlite_where=_WHERE, postgresql_where=_WHERE)


def downgrade() -> None:
    named = op.get_bind().execute(
        sa.text('SELECT count(*) FROM payloads WHERE segment IS NOT NULL')).scalar()
    if named:  # dropping the columns would leave those rows with no bytes at all
        raise RuntimeError(f'{named} queue payload(s) lie in segment files under '
                           'data_dir/payloads/; deliver or drop them before downgrading')
    with op.batch_alter_table('payloads', schema=None) as batch_op:
        batch_op.drop_index('ix_payloads_segment')
        batch_op.drop_column('seg_length')
        batch_op.drop_column('seg_offset')
        batch_op.drop_column('segment')
