"""The single place where mail-server secrets are encrypted and decrypted.

Passwords (and, later, OAuth2 tokens) are stored as Fernet tokens (AES-128-CBC + HMAC-SHA256,
authenticated, with a timestamp). ``MultiFernet`` lets the operator add a new key in front of
the old ones: everything still decrypts, new writes use the new key, and
``mailroom rotate-keys`` re-encrypts the old rows so the old key can be dropped.
"""

from __future__ import annotations

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from shared.settings import Settings


class SecretDecryptError(Exception):
    """A stored secret no configured key can open (a key was removed too early)."""


class SecretBox:
    """Encrypts secrets under the newest key; decrypts under any configured key."""

    def __init__(self, keys: list[str]) -> None:
        if not keys:
            raise ValueError("at least one encryption key is required")
        self._fernet = MultiFernet([Fernet(key.encode()) for key in keys])

    @classmethod
    def from_settings(cls, settings: Settings) -> SecretBox:
        return cls(settings.fernet_keys)

    def encrypt(self, plaintext: str) -> bytes:
        return self._fernet.encrypt(plaintext.encode("utf-8"))

    def decrypt(self, token: bytes) -> str:
        try:
            return self._fernet.decrypt(bytes(token)).decode("utf-8")
        except InvalidToken as exc:
            raise SecretDecryptError("stored secret cannot be decrypted with any key") from exc

    def rotate(self, token: bytes) -> bytes:
        """The same secret, re-encrypted under the newest key."""
        try:
            return self._fernet.rotate(bytes(token))
        except InvalidToken as exc:
            raise SecretDecryptError("stored secret cannot be decrypted with any key") from exc
