# HMAC-SHA256 (RFC 2104) on hashlib.sha256: MicroPython has no hmac module. Used to sign
# telemetry/events and to verify commands (CONTRACT 5.5). Pure function of bytes, no I/O.
import binascii
import hashlib

_BLOCK = 64


class Hmac:
    """A key prepared once (padded, xored): sign many messages without redoing it.
    MicroPython's sha256 objects cannot be copied, so each digest re-hashes the 64-byte pads."""

    def __init__(self, key):
        if len(key) > _BLOCK:
            key = hashlib.sha256(key).digest()
        k = bytearray(_BLOCK)
        k[: len(key)] = key
        ipad = bytearray(_BLOCK)
        opad = bytearray(_BLOCK)
        for i in range(_BLOCK):
            ipad[i] = k[i] ^ 0x36
            opad[i] = k[i] ^ 0x5C
        self._ipad = bytes(ipad)
        self._opad = bytes(opad)

    def digest(self, *parts):
        """HMAC of the concatenation of parts (bytes, bytearray or memoryview)."""
        h = hashlib.sha256(self._ipad)
        for p in parts:
            h.update(p)
        o = hashlib.sha256(self._opad)
        o.update(h.digest())
        return o.digest()

    def hexdigest(self, *parts):
        """Lowercase hex HMAC as bytes (64 ASCII characters)."""
        return binascii.hexlify(self.digest(*parts))


def hmac_sha256(key, msg):
    """HMAC-SHA256 of msg under key, 32 bytes."""
    return Hmac(key).digest(msg)


def hexdigest(key, msg):
    """HMAC-SHA256 of msg under key as a lowercase hex str."""
    return Hmac(key).hexdigest(msg).decode()


def equal(a, b):
    """Constant-time comparison of two byte strings (time depends only on their lengths)."""
    if len(a) != len(b):
        return False
    r = 0
    for i in range(len(a)):
        r |= a[i] ^ b[i]
    return r == 0
