"""Talking to mail servers: TLS, IMAP, POP3, SMTP adapters and their failure reasons."""
