"""The project's mail lab: real mail servers on loopback for integration tests and benchmarks.

Plain classes, no pytest: ``certs.issue`` makes a CA and server certificates,
``dovecot.DovecotLab`` runs a private Dovecot (IMAP, POP3, TLS, SNI, IDLE, COMPRESS).
``fixtures`` wraps them as pytest fixtures for a conftest or a test module to import.
"""
