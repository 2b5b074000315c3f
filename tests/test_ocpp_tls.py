"""OCPP security profile 2 (CONTRACT §11): TLS with Basic auth on the agent's endpoint;
plain WebSocket off loopback is refused at start."""

from __future__ import annotations

import pathlib
import ssl

import pytest
import websockets

from agent.config import ConfigError, load_config
from agent.store import Store
from tests.ocpp_helpers import PASSWORD, OcppAgent
from tests.test_ingest_tls import make_certs
from tools.ocpp_sim import SimChargePoint, SimClock


async def test_profile_2_tls_with_basic_auth(tmp_path: pathlib.Path) -> None:
    make_certs(tmp_path)
    url = str(tmp_path / "agent.db")
    tls = {"tls_cert": str(tmp_path / "server.pem"), "tls_key": str(tmp_path / "server.key")}
    async with OcppAgent(url, {"OCPP-TLS": PASSWORD}, **tls) as ag:
        ctx = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
        cp = SimChargePoint(
            f"wss://127.0.0.1:{ag.port}", "OCPP-TLS", PASSWORD, clock=SimClock(manual=True), ssl=ctx
        )
        await cp.connect()
        await cp.boot()
        await cp.close()
        # plain WebSocket to the TLS port: no handshake
        plain = SimChargePoint(
            f"ws://127.0.0.1:{ag.port}", "OCPP-TLS", PASSWORD, response_timeout=3
        )
        with pytest.raises((websockets.InvalidMessage, OSError, TimeoutError)):
            await plain.connect()
        # TLS, but a certificate the charger does not trust: refused by the charger
        other = SimChargePoint(
            f"wss://127.0.0.1:{ag.port}", "OCPP-TLS", PASSWORD, ssl=ssl.create_default_context()
        )
        with pytest.raises(ssl.SSLCertVerificationError):
            await other.connect()
    with Store(url, create=False) as s:
        assert s.db.execute("SELECT COUNT(*) FROM raw WHERE sid = 'OCPP-TLS'").fetchone()[0] == 1


def test_plain_websocket_off_loopback_is_refused(tmp_path: pathlib.Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text('[db]\nurl = "agent.db"\n[ocpp]\nlisten = "0.0.0.0:9000"\n')
    with pytest.raises(ConfigError, match="profile 2 needs TLS"):
        load_config(cfg)
    cfg.write_text('[db]\nurl = "agent.db"\n[ocpp]\nlisten = "0.0.0.0:9000"\ntls_cert = "c.pem"\n')
    with pytest.raises(ConfigError, match="go together"):
        load_config(cfg)
    cfg.write_text('[db]\nurl = "agent.db"\n[ocpp]\nlisten = "127.0.0.1:9000"\nid_tags = ["A1"]\n')
    assert load_config(cfg).ocpp is not None


@pytest.mark.parametrize("version", ["1.6", "2.0.1"])
async def test_authorize_accepts_the_configured_tags(tmp_path: pathlib.Path, version: str) -> None:
    async with OcppAgent(str(tmp_path / "a.db"), {"OCPP-AUTH": PASSWORD}, id_tags=("A1",)) as ag:
        cp = SimChargePoint(
            f"ws://127.0.0.1:{ag.port}", "OCPP-AUTH", PASSWORD, version=version,
            clock=SimClock(manual=True),
        )  # fmt: skip
        await cp.connect()
        await cp.boot()
        ok, bad = await cp.authorize("A1"), await cp.authorize("B2")
        await cp.close()
    info = "id_tag_info" if version == "1.6" else "id_token_info"
    assert getattr(ok, info)["status"] == "Accepted"
    assert getattr(bad, info)["status"] == "Invalid"
