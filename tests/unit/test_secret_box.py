"""Secrets encrypt under the newest key and decrypt under any configured one."""

from __future__ import annotations

import pytest
from cryptography.fernet import Fernet

from shared.secrets import SecretBox, SecretDecryptError


def test_encrypted_secret_decrypts_and_hides_the_plaintext() -> None:
    box = SecretBox([Fernet.generate_key().decode()])
    token = box.encrypt("pässwört 🔑")
    assert "pässwört".encode() not in token
    assert box.decrypt(token) == "pässwört 🔑"


def test_rotation_moves_secrets_to_the_new_key() -> None:
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    token = SecretBox([old]).encrypt("s3cret")
    both = SecretBox([new, old])
    assert both.decrypt(token) == "s3cret"
    rotated = both.rotate(token)
    assert SecretBox([new]).decrypt(rotated) == "s3cret"
    with pytest.raises(SecretDecryptError):
        SecretBox([new]).decrypt(token)


def test_a_box_needs_a_key() -> None:
    with pytest.raises(ValueError, match="at least one"):
        SecretBox([])
