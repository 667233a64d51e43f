"""OAuth2 mail accounts: providers, the consent's token exchange, and fresh access tokens."""
