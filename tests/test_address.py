"""The relay address grammar (wire/address.py, docs/PROTOCOL.md section 1)."""

from __future__ import annotations

import pytest

from wire.address import AddressError, parse_address

PIN = "mbreknqnpggphejlhj4cjzdlahadqh3esrd5jtn4c5s3ljgflhaa"
ONION = "a" * 52 + "bcdq.onion"
KEY = "c" * 52


@pytest.mark.parametrize(
    ("text", "canonical", "secure", "plain_ok"),
    [
        (f"wss://127.0.0.1:4433#{PIN}", f"wss://127.0.0.1:4433#{PIN}", True, True),
        (f"WSS://Relay.Example:4433/v1#{PIN.upper()}", f"wss://relay.example:4433#{PIN}", True, False),
        ("wss://chat.example.org", "wss://chat.example.org", True, False),
        ("wss://chat.example.org:443/", "wss://chat.example.org", True, False),
        ("ws://127.0.0.1:8765", "ws://127.0.0.1:8765", False, True),
        ("ws://[::1]:8765", "ws://[::1]:8765", False, True),
        ("ws://localhost:80", "ws://localhost", False, True),
        (f"ws://{ONION}", f"ws://{ONION}", False, True),
        (f"ws://{ONION}#client={KEY}", f"ws://{ONION}#client={KEY}", False, True),
        ("ws://192.0.2.7:8765", "ws://192.0.2.7:8765", False, False),
    ],
)
def test_addresses_parse_to_one_canonical_form(text: str, canonical: str, secure: bool, plain_ok: bool) -> None:
    address = parse_address(text)
    assert str(address) == canonical
    assert parse_address(canonical) == address
    assert address.secure is secure
    assert address.plain_allowed is plain_ok
    assert "#" not in address.url


def test_a_client_key_is_never_in_the_public_form() -> None:
    address = parse_address(f"ws://{ONION}#client={KEY}")
    assert address.client_key == KEY
    assert KEY not in str(address.public) and KEY not in address.url
    assert address.same_relay(parse_address(f"ws://{ONION}"))


def test_same_relay_is_the_same_key_when_both_pin_one() -> None:
    pinned = parse_address(f"wss://relay.example:4433#{PIN}")
    assert pinned.same_relay(parse_address("wss://relay.example:4433"))
    assert not pinned.same_relay(parse_address("wss://relay.example:4433#" + "b" * 52))
    assert pinned.same_relay(parse_address(f"wss://192.0.2.7:4434#{PIN}"))  # another way to it
    assert not pinned.same_relay(parse_address("wss://relay.example:4434"))


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "empty"),
        ("127.0.0.1:8765", "is not a relay address"),
        ("http://127.0.0.1:8765", "the scheme must be"),
        ("wss://127.0.0.1:8765/v2", "without a path"),
        ("wss://127.0.0.1:8765/?x=1", "without a path"),
        ("wss://user:pw@127.0.0.1:8765", "no user name"),
        ("wss://127.0.0.1:0", "port 0"),
        ("wss://127.0.0.1:99999", "bad relay address"),
        ("wss://bad_host!:8765", "is not a host name"),
        ("wss://[::g]:8765", "bad relay address"),
        ("wss://127.0.0.1:8765#short", "52 base32 letters"),
        (f"wss://127.0.0.1:8765#{'1' * 52}", "52 base32 letters"),
        (f"ws://127.0.0.1:8765#{PIN}", "only with wss://"),
        (f"wss://{ONION}#client={KEY}", "only with ws:// to an onion"),
        (f"ws://127.0.0.1:8765#client={KEY}", "only with ws:// to an onion"),
        (f"ws://{ONION}#client=short", "52 base32 letters"),
        ("ws://abc.onion", "56 letters"),
    ],
)
def test_malformed_addresses_say_what_is_wrong(text: str, fragment: str) -> None:
    with pytest.raises(AddressError, match=fragment) as caught:
        parse_address(text)
    assert "\n" not in str(caught.value)
