"""A send request costs PostgreSQL less per mail: no command kept for nothing, HOT updates.

- The command is kept only when an attempt follows later. A first attempt has it in hand (it
  came with the AMQP delivery, and a crash brings it again, unacked); only a retry made by
  dramatiq, which carries nothing but the request's key, reads it from the row. Storing every
  row's ~2 KB JSON document (parsed, compressed or TOASTed, logged) was a tenth of
  PostgreSQL's CPU per mail in the sender benchmark (0.77 -> 0.69 ms, median of six rounds,
  lower in each), and most of the table's size.
- A mail updates its row twice (the mark before its final ``.``, then ``sent``). No index
  covers ``state`` any more (nothing read ``send_requests_open``), and pages keep room for
  those updates (fillfactor), so both are HOT updates (a new row version on the same page, no
  new index entries): 100% of them in the benchmark, 44% before. That did not change
  PostgreSQL's CPU per mail measurably; it keeps the primary key from bloating.

Revision ID: 0007
Revises: 0006
"""

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE send_requests ALTER COLUMN command DROP NOT NULL")
    op.execute(
        "COMMENT ON COLUMN send_requests.command IS"
        " 'The send command, kept from the first retry on (NULL while only the first attempt"
        " needed it: that attempt had it in hand)'"
    )
    op.execute("DROP INDEX send_requests_open")
    op.execute("ALTER TABLE send_requests SET (fillfactor = 50)")


def downgrade() -> None:
    op.execute("ALTER TABLE send_requests RESET (fillfactor)")
    op.execute(
        "CREATE INDEX send_requests_open ON send_requests (state)"
        " WHERE state NOT IN ('sent', 'failed')"
    )
    op.execute("UPDATE send_requests SET command = '{}'::jsonb WHERE command IS NULL")
    op.execute("ALTER TABLE send_requests ALTER COLUMN command SET NOT NULL")
