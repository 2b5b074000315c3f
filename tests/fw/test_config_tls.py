# broker.ca (the pinned broker CA, DER as base64) in config.json: required with tls,
# checked for form at start, and loadable by the TLS library of the interpreter running it
# (MicroPython's mbedTLS on the unix port, CPython's ssl where the flashing tool checks it).
import binascii

import config
import mqtt_client
from fwtest import raises

# a self-signed P-256 CA certificate (389 bytes of DER), as `openssl x509 -outform DER | base64`
CA = (
    "MIIBgTCCASegAwIBAgIUPeC0bD+pbxZjvC155gMzk0C3t2IwCgYIKoZIzj0EAwIwFTETMBEGA1UEAwwKZncgdGVz"
    "dCBDQTAgFw0yNjEyMDMyMTI5MTBaGA8yMTI2MTEwOTIxMjkxMFowFTETMBEGA1UEAwwKZncgdGVzdCBDQTBZMBMG"
    "ByqGSM49AgEGCCqGSM49AwEHA0IABDhUMlEZECAyhzCDVeCp1ep2G7UiaygWQiOW/4V8XSRfvXpPcgW2b7MsuvhY"
    "GS5uTfsNYBcOkG5NU23Ntpu0hQ+jUzBRMB0GA1UdDgQWBBQ5hJcloqpQRoUOIf4iqz3gqGHxyDAfBgNVHSMEGDAW"
    "gBQ5hJcloqpQRoUOIf4iqz3gqGHxyDAPBgNVHRMBAf8EBTADAQH/MAoGCCqGSM49BAMCA0gAMEUCIQDhIdgKkX06"
    "vIJ4+NmLMzwAfmT2ORru+f00xuHTe6k/VgIgRtA9S3lgz4DU1mrUWFkxyZ2+8V7eqV2S2byrBTqhNIQ="
)


def tls_cfg(**broker):
    c = config.example()
    c["broker"]["tls"] = True
    c["broker"]["port"] = 8883
    c["broker"].update(broker)
    return c


def b64(data):
    return binascii.b2a_base64(data).decode().strip()


def test_tls_with_the_ca_is_valid_and_gives_its_der():
    cfg = config.validate(tls_cfg(ca=CA))
    der = config.tls_ca(cfg)
    assert len(der) == 389 and der[:2] == b"\x30\x82" and der == binascii.a2b_base64(CA)


def test_tls_without_a_ca_is_refused_by_name():
    c = tls_cfg()
    e = raises(config.ConfigError, config.validate, c)
    assert e.key == "broker.ca" and e.why.startswith("missing"), (e.key, e.why)
    # an explicit null is no way to turn verification off: stations always verify
    e = raises(config.ConfigError, config.validate, tls_cfg(ca=None))
    assert e.key == "broker.ca" and e.why.startswith("missing"), (e.key, e.why)


def test_plain_mqtt_needs_no_ca():
    cfg = config.validate(config.example())
    assert cfg["broker"]["tls"] is False and cfg["broker"]["ca"] is None
    assert config.tls_ca(cfg) is None


def test_malformed_ca_is_refused_by_name():
    der = binascii.a2b_base64(CA)
    pem = "-----BEGIN CERTIFICATE-----\n" + CA + "\n-----END CERTIFICATE-----\n"
    cases = [
        pem,  # PEM text: this interpreter's mbedTLS may not parse it (see docs/firmware.md)
        CA[:64] + "\n" + CA[64:],  # split into lines
        CA + " ",
        CA.rstrip("="),  # padding lost
        CA[:-8],  # cut short (still a multiple of 4 characters)
        "@" + CA[1:],
        b64(der[:-1]),  # DER one byte short
        b64(der + b"\x00"),  # a byte after the certificate
        b64(b"\x31" + der[1:]),  # not a SEQUENCE
        b64(der[:4] + b"\x02\x01\x00"),  # a SEQUENCE holding no signed part
        b64(b"hello, world"),
        "",
        "AAAA" * 2000,  # longer than any CA certificate
        123,
        {"pem": CA},
    ]
    for v in cases:
        e = raises(config.ConfigError, config.validate, tls_cfg(ca=v))
        assert e.key == "broker.ca", (v, e.key)
    # malformed is malformed with tls off too
    c = config.example()
    c["broker"]["ca"] = b64(b"hello, world")
    assert raises(config.ConfigError, config.validate, c).key == "broker.ca"


def test_the_tls_library_loads_the_ca_and_the_client_requires_one():
    der = config.tls_ca(config.validate(tls_cfg(ca=CA)))
    ctx = mqtt_client.tls_context(der)
    assert ctx is not None
    # no CA, no TLS: a station never connects without checking whom it talks to
    e = raises(ValueError, mqtt_client.MQTTClient, "127.0.0.1", 8883, "KH-PNH-0001", tls=True)
    assert "CA" in str(e)
    c = mqtt_client.MQTTClient("127.0.0.1", 8883, "KH-PNH-0001", tls=True, ca=der)
    assert c.counters()["cert_errors"] == 0
