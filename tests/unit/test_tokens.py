"""Bearer tokens carry tenant and permissions, signed; anything else is refused."""

from __future__ import annotations

import pytest

from shared.tokens import MANAGE, READ, InvalidTokenError, mint_token, verify_token

KEY = "k" * 48


def test_token_round_trip_names_tenant_subject_and_permissions() -> None:
    token = mint_token(
        KEY, tenant_id="acme", permissions=[READ, READ], subject="ann", ttl_seconds=60
    )
    principal = verify_token(KEY, token)
    assert (principal.tenant_id, principal.subject) == ("acme", "ann")
    assert principal.permissions == frozenset({READ})


def test_manage_implies_read_but_not_the_reverse() -> None:
    manager = verify_token(
        KEY, mint_token(KEY, tenant_id="t", permissions=[MANAGE], subject="s", ttl_seconds=60)
    )
    reader = verify_token(
        KEY, mint_token(KEY, tenant_id="t", permissions=[READ], subject="s", ttl_seconds=60)
    )
    assert manager.may(READ) and manager.may(MANAGE)
    assert reader.may(READ) and not reader.may(MANAGE)


@pytest.mark.parametrize(
    "token",
    [
        "",
        "garbage",
        mint_token("other" * 10, tenant_id="t", permissions=[], subject="s", ttl_seconds=60),
        mint_token(KEY, tenant_id="t", permissions=[], subject="s", ttl_seconds=-1),
    ],
)
def test_forged_expired_or_malformed_tokens_are_refused(token: str) -> None:
    with pytest.raises(InvalidTokenError):
        verify_token(KEY, token)
