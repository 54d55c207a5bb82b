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
# PostgreSQL store: the AES-SIV key of the columns SQLCipher would have protected, and what
# the database records to tell a process started with another relay key.
RELAY_COLUMN_KEY = b"veil/v1/relay-column-key"
RELAY_KEY_CHECK = b"veil/v1/relay-key-check"

# Signature contexts (prefixed to the signed bytes).
AUTH_CHALLENGE = b"veil/v1/auth-challenge"
DEVICE_SIGNATURE = b"veil/v1/device"
ENVELOPE_SIGNATURE = b"veil/v1/envelope"

# A device's name, encrypted by the account's devices: HKDF info under the identity key's
# seed, and the prefix of its AES-GCM associated data.
DEVICE_LABEL = b"veil/v1/device-label"

# AEAD associated-data prefixes.
ENVELOPE_AAD = b"veil/v1/envelope-aad"
BUNDLE_AAD = b"veil/v1/bundle"

# Hash prefix for the numeric safety-number fingerprint.
SAFETY_NUMBER = b"veil/v1/safety-number"
# Hash prefix for the identity-key fingerprint that invite links carry.
IDENTITY_FINGERPRINT = b"veil/v1/identity-fingerprint"
# The identity key signs the account's other public keys, so the safety number (of the
# identity key) vouches for the RSA key that envelopes are sealed to.
ACCOUNT_KEYS_SIGNATURE = b"veil/v1/account-keys"

# Forward secrecy: prekeys, X3DH and the Double Ratchet with header encryption.
PREKEY_SIGNATURE = b"veil/v1/signed-prekey"  # signature context for a signed prekey
X3DH_SK = b"veil/v1/x3dh-sk"  # HKDF info: F || DH1 || DH2 || DH3 [|| DH4] -> SK
X3DH_ROOT = b"veil/v1/x3dh-root"  # HKDF info: SK -> the ratchet's first root key
X3DH_HEADER_A = b"veil/v1/x3dh-header-a"  # HKDF info: SK -> shared_hka (initiator's first HKs)
X3DH_HEADER_B = b"veil/v1/x3dh-header-b"  # HKDF info: SK -> shared_nhkb (responder's first NHKs)
X3DH_AD = b"veil/v1/x3dh-ad"  # prefix of the X3DH associated data
RATCHET_ROOT = b"veil/v1/ratchet-root"  # HKDF info of KDF_RK (root, chain, next header key)
RATCHET_MESSAGE = b"veil/v1/ratchet-message"  # HKDF info: message key -> AES key and nonces
RATCHET_HEADER_AAD = b"veil/v1/ratchet-header"  # AEAD associated data of an encrypted header

# Post-quantum: ML-KEM-768 keys signed by the identity key, PQXDH and the hybrid envelope.
KEM_KEY_SIGNATURE = b"veil/v1/kem-key"  # signature context: u8 use || u32 id || device_id || public
PQXDH_SK = b"veil/v1/pqxdh-sk"  # HKDF info: F || DH1 || DH2 || DH3 [|| DH4] || SS -> SK
ENVELOPE_HYBRID = b"veil/v1/envelope-hybrid"  # HKDF info: RSA secret || KEM secret -> AES key
RATCHET_ROOT_KEM = b"veil/v1/ratchet-root-kem"  # HKDF info of KDF_RK_KEM (DH output || KEM secret)

# Groups (keyvault.group).
GROUP_CHANGE = b"veil/v1/group-change"  # signature context of a group's change
GROUP_ID = b"veil/v1/group-id"  # SHA-256 prefix: a creation's body -> the group's id

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
    RELAY_COLUMN_KEY,
    RELAY_KEY_CHECK,
    AUTH_CHALLENGE,
    DEVICE_SIGNATURE,
    DEVICE_LABEL,
    ENVELOPE_SIGNATURE,
    ENVELOPE_AAD,
    BUNDLE_AAD,
    SAFETY_NUMBER,
    IDENTITY_FINGERPRINT,
    ACCOUNT_KEYS_SIGNATURE,
    PREKEY_SIGNATURE,
    X3DH_SK,
    X3DH_ROOT,
    X3DH_HEADER_A,
    X3DH_HEADER_B,
    X3DH_AD,
    RATCHET_ROOT,
    RATCHET_MESSAGE,
    RATCHET_HEADER_AAD,
    KEM_KEY_SIGNATURE,
    PQXDH_SK,
    ENVELOPE_HYBRID,
    RATCHET_ROOT_KEM,
    GROUP_CHANGE,
    GROUP_ID,
)
