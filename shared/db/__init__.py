"""PostgreSQL access: connection pool, migrations and the SQL of each table."""
