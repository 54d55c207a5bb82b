"""Invite links (issue 12): `veil invite`, `veil contact add LINK`, `/add` in the chat,
`veil relay invite`; through the `veil` command with a real relay process, and in-process
where the relay must be made to lie."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from keyvault.keys import AccountKeys, sign_account_keys
from keyvault.safety import identity_fingerprint
from node.errors import IdentityChanged, KeyDiffers, VeilError
from tests.conftest import Accounts
from tests.test_cli import (
    RelayProcess,
    User,
    assert_one_line_error,
    registered,
    start_relay,
    stop_relay,
)
from tests.test_relay_support import sql
from wire.address import b32, parse_address
from wire.invite import ContactLink, LinkError, parse_link


def invite_of(user: User) -> str:
    out = user.veil("invite").stdout.splitlines()
    assert len(out) == 1 and out[0].startswith("veil:contact?"), out
    return out[0]


def contacts(user: User) -> dict[str, dict[str, object]]:
    return {c["name"]: c for c in map(json.loads, user.veil("contacts", "--json").stdout.splitlines())}


def test_a_link_adds_a_verified_contact_whose_safety_number_matches(relay_proc: RelayProcess, tmp_path: Path) -> None:
    alice, bob = registered(tmp_path, relay_proc, "alice", "bob")
    link = invite_of(alice)
    parsed = parse_link(link)
    assert parsed.name == "alice" and str(parsed.relay) == relay_proc.url  # the relay, with its pin

    out = bob.veil("contact", "add", link).stdout
    assert out.startswith("added alice as a verified contact")
    seen = contacts(bob)["alice"]
    assert seen["verified"] is True and seen["key_changed"] is False
    # Alice's own view of the pair (she looks bob up, unverified) has the same number.
    alice.veil("verify", "bob")
    assert contacts(alice)["bob"]["safety_number"] == seen["safety_number"]
    assert " ".join(str(seen["safety_number"])[i:i + 5] for i in range(0, 60, 5)) in out

    bob.veil("send", "alice", "found you by your link")
    assert "found you by your link" in alice.veil("recv", "--json").stdout
    # Adding it again changes nothing and says so.
    assert bob.veil("contact", "add", link).stdout.startswith("updated alice as a verified contact")

    qr = alice.veil("invite", "--qr").stdout.splitlines()
    assert qr[-1] == link and len(qr) > 10 and any("█" in line or "▀" in line for line in qr)


def test_a_link_whose_key_the_relay_does_not_have_is_refused(relay_proc: RelayProcess, tmp_path: Path) -> None:
    _, carol, dave = registered(tmp_path, relay_proc, "alice", "carol", "dave")
    # A link naming alice but with carol's key fingerprint: what a relay handing out other
    # keys for alice looks like from dave's side.
    forged = str(parse_link(invite_of(carol))).replace("name=carol", "name=alice")
    res = dave.veil("contact", "add", forged, check=False)
    assert_one_line_error(res, "the relay's keys for alice do not match the link's: alice was not added")
    assert "alice" not in contacts(dave)


def test_bad_links_get_one_line(relay_proc: RelayProcess, tmp_path: Path) -> None:
    (alice, bob) = registered(tmp_path, relay_proc, "alice", "bob")
    link = invite_of(alice)
    cases = [
        ("hello", "is not a Veil contact link"),
        (link[:60], "incomplete"),
        (link.replace("v=1", "v=9"), "version '9'"),
        (link.replace("id=", "id=x"), "bad key fingerprint"),
        (link + "&name=eve", "name appears twice"),
    ]
    for text, fragment in cases:
        res = bob.veil("contact", "add", text, check=False)
        assert_one_line_error(res, fragment)
    # A link for someone on another relay (another key, another port).
    elsewhere = start_relay(tmp_path / "other", 0)
    try:
        carol = User(tmp_path / "other", "carol")
        carol.veil("register", "carol", "--relay", elsewhere.url)
        res = bob.veil("contact", "add", invite_of(carol), check=False)
        assert_one_line_error(res, "on another relay")
        assert_one_line_error(res, "veil does not reach across relays yet")
    finally:
        stop_relay(elsewhere)
    assert bob.veil("contact", "add", link).returncode == 0  # what bob has is untouched


def test_relay_invite_prints_the_address_people_register_with(relay_proc: RelayProcess, tmp_path: Path) -> None:
    res = User(tmp_path, "op").veil("relay", "invite", "--data-dir", str(relay_proc.data_dir))
    assert res.stdout.splitlines() == [relay_proc.url]
    named = User(tmp_path, "op").veil("relay", "invite", "--data-dir", str(relay_proc.data_dir),
                                      "--host", "relay.example.org", "--json")
    (address,) = json.loads(named.stdout)["addresses"]
    assert address == relay_proc.url.replace("127.0.0.1", "relay.example.org")
    qr = User(tmp_path, "op").veil("relay", "invite", "--qr", "--data-dir", str(relay_proc.data_dir)).stdout
    assert qr.splitlines()[-1] == relay_proc.url and len(qr.splitlines()) > 10
    # Registering with what it printed works (the pin is checked).
    registered(tmp_path, relay_proc, "erin")
    res = User(tmp_path, "op").veil("relay", "invite", "--data-dir", str(tmp_path / "nowhere"), check=False)
    assert_one_line_error(res, "no relay has started on")


def test_the_link_grammar() -> None:
    relay = parse_address("wss://127.0.0.1:8765#" + "m" * 52)
    link = ContactLink(relay, "alice", bytes(range(32)))
    text = str(link)
    assert text == ("veil:contact?v=1&name=alice&id=" + b32(bytes(range(32)))
                    + "&relay=wss%3A%2F%2F127.0.0.1%3A8765%23" + "m" * 52)
    assert parse_link(text) == link
    assert parse_link(text[:40] + "\n  " + text[40:]) == link  # wrapped over lines
    reordered = "veil:contact?relay=" + text.split("&relay=")[1] + "&id=" + b32(bytes(range(32))) + "&name=Alice&v=1"
    assert parse_link(reordered) == link
    assert parse_link(text + "&future=1") == link
    onion = "ws://" + "a" * 52 + "bcdq.onion"
    with pytest.raises(LinkError, match="client key"):
        parse_link(str(ContactLink(parse_address(onion), "alice", bytes(32))).replace(
            "onion", "onion%23client%3D" + "c" * 52))
    with pytest.raises(LinkError, match="far too long"):
        parse_link(text + "&x=" + "a" * 2000)


async def test_a_relay_that_later_hands_out_other_keys_for_a_linked_name_is_refused(
    accounts: Accounts, key_pool: list[AccountKeys]
) -> None:
    alice = await accounts.register("alice")
    bob = await accounts.register("bob")
    invite = ContactLink(parse_address(alice.relay).public, "alice", identity_fingerprint(alice.keys.public().identity))
    contact, new = await bob.add_from_link(invite)
    assert new and contact.verified
    async with bob.connected() as link:
        await bob.send(link, "alice", "first")

    # The relay now serves other keys, properly signed by another identity, for alice.
    other = key_pool[-1].public()
    await sql(accounts.relay, "UPDATE accounts SET enc_pub = ?, identity_pub = ?, dh_pub = ?, keys_sig = ?"
              " WHERE identity_pub = ?", other.enc, other.identity, other.dh,
              sign_account_keys(key_pool[-1], "alice"), alice.keys.public().identity)
    with pytest.raises(IdentityChanged, match="sending is held"):
        async with bob.connected() as link:
            await bob.send(link, "alice", "not to an impostor")
    # A link with the relay's new key does not quietly replace the verified one.
    new_link = ContactLink(invite.relay, "alice", identity_fingerprint(other.identity))
    with pytest.raises(KeyDiffers, match="not the one verified on this device: nothing changed"):
        await bob.add_from_link(new_link)
    held = bob.store.contact("alice")
    assert held is not None and held.verified and held.key_changed  # still held, as before the link
    replaced, _ = await bob.add_from_link(new_link, replace=True)
    assert replaced.identity_pub == other.identity and replaced.verified and not replaced.key_changed
    # And the old link, given to someone new, adds nothing.
    carol = await accounts.register("carol")
    with pytest.raises(VeilError, match="do not match the link"):
        await carol.add_from_link(invite)
    assert carol.store.contact("alice") is None
