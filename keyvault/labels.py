"""Every domain-separation label in Veil, in one place.

Each KDF, HKDF and signature context has its own label so that no key or signature made for
one purpose can ever be accepted for another. Never reuse a label for a new purpose; add one.
"""

from __future__ import annotations

# HKDF labels under the Argon2id master key (password) or the recovery code.
BUNDLE_WRAP = b"veil/v1/bundle-wrap"
AUTH_SEED = b"veil/v1/auth-seed"
DEVICE_STORE = b"veil/v1/device-store"
RECOVERY_WRAP = b"veil/v1/recovery-wrap"
RECOVERY_AUTH = b"veil/v1/recovery-auth"

# HKDF labels under the relay's own secret.
RELAY_DB_KEY = b"veil/v1/relay-db-key"
RELAY_NAME_HMAC = b"veil/v1/relay-name-hmac"
RELAY_FAKE_SALT = b"veil/v1/relay-fake-salt"

# Signature contexts (prefixed to the signed bytes).
AUTH_CHALLENGE = b"veil/v1/auth-challenge"
DEVICE_SIGNATURE = b"veil/v1/device"
ENVELOPE_SIGNATURE = b"veil/v1/envelope"

# AEAD associated-data prefixes.
ENVELOPE_AAD = b"veil/v1/envelope-aad"
BUNDLE_AAD = b"veil/v1/bundle"

# Hash prefix for the numeric safety-number fingerprint.
SAFETY_NUMBER = b"veil/v1/safety-number"

#: All labels, so a test can check that they are pairwise distinct and none is a prefix of
#: another used in the same role.
ALL_LABELS: tuple[bytes, ...] = (
    BUNDLE_WRAP,
    AUTH_SEED,
    DEVICE_STORE,
    RECOVERY_WRAP,
    RECOVERY_AUTH,
    RELAY_DB_KEY,
    RELAY_NAME_HMAC,
    RELAY_FAKE_SALT,
    AUTH_CHALLENGE,
    DEVICE_SIGNATURE,
    ENVELOPE_SIGNATURE,
    ENVELOPE_AAD,
    BUNDLE_AAD,
    SAFETY_NUMBER,
)
