"""The agent's TOML configuration: every key of the example, errors that name the key."""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys

import pytest

from agent.config import ConfigError, load_config
from tests.agent_helpers import STATIONCTL
from tests.helpers import ROOT

EXAMPLE = ROOT / "agent" / "config.example.toml"


def test_example_loads_with_defaults_and_relative_paths(tmp_path: pathlib.Path) -> None:
    shutil.copy(EXAMPLE, tmp_path / "agent.toml")
    c = load_config(tmp_path / "agent.toml")
    assert c.db.url == f"sqlite:///{tmp_path}/agent.db" and c.db.synchronous == "full"
    assert (c.broker.host, c.broker.port, c.broker.prefix) == ("127.0.0.1", 1883, "stations")
    assert c.broker.client_id == "stationctl-agent" and not c.broker.tls
    assert c.metering.interval_ms == 900_000 and c.carbon_params is None
    assert c.broker.topics() == [
        ("stations/+/telemetry", 1),
        ("stations/+/event", 1),
        ("stations/+/status", 1),
        ("$SYS/broker/publish/messages/dropped", 0),  # the broker's drops, alarmed
    ]
    assert c.cluster is None and c.db.archive_dir is None


def test_every_key(tmp_path: pathlib.Path) -> None:
    (tmp_path / "pw").write_text("s3cret\n")
    (tmp_path / "carbon.toml").write_text("")
    (tmp_path / "agent.toml").write_text(
        '[db]\nurl = "postgresql://db/agents"\nsynchronous = "normal"\narchive_dir = "seg"\n'
        '[broker]\nhost = "b.example"\nport = 8883\nuser = "agent"\npassword_file = "pw"\n'
        'tls = true\ntls_ca = "ca.pem"\ntls_insecure = false\nclient_id = "a1"\n'
        'prefix = "fleet/kh"\nkeepalive = 10\nwatch_dropped = false\n'
        "[ingest]\nbatch_max = 100\nmax_pending = 1000\nrecords_interval_ms = 2000\n"
        "key_reload_s = 5\nstats_interval_s = 10\ngc_full_s = 0\n"
        "[metering]\ninterval_ms = 300000\nmax_power_w_slot = 5000\n"
        '[carbon]\nparams = "carbon.toml"\n'
        '[cluster]\nshards = 4\nagent_id = "host-a"\nbalance_s = 2\n'
    )
    c = load_config(tmp_path / "agent.toml")
    assert c.db.url == "postgresql://db/agents" and c.broker.password == "s3cret"
    assert c.db.archive_dir == str(tmp_path / "seg")
    assert c.cluster is not None and (c.cluster.shards, c.cluster.ident()) == (4, "host-a")
    assert c.broker.tls_ca == str(tmp_path / "ca.pem") and c.broker.prefix == "fleet/kh"
    assert c.broker.topics() == [
        ("fleet/kh/+/telemetry", 1),
        ("fleet/kh/+/event", 1),
        ("fleet/kh/+/status", 1),
    ]  # (no $SYS watch: turned off)
    assert c.ingest.key_reload_s == 5 and c.ingest.gc_full_s == 0
    assert c.metering.interval_ms == 300_000 and c.carbon_params == str(tmp_path / "carbon.toml")


@pytest.mark.parametrize(
    "text, needle",
    [
        ("[broker]\nprot = 1\n", "broker.prot"),
        ("[brokr]\n", "'brokr'"),
        ('[broker]\nport = "1883"\n', "broker.port must be int"),
        ("[broker]\ntls = 1\n", "broker.tls must be bool"),
        ('[broker]\nprefix = "a/+"\n', "broker.prefix"),
        ('[db]\nsynchronous = "sometimes"\n', "synchronous"),
        ("[metering]\ninterval_ms = 7\n", "interval_ms"),
        ('[carbon]\nparams = "missing.toml"\n', "carbon.params"),
        ("[broker\n", "agent.toml"),
        ('[broker]\npassword = "x"\npassword_file = "pw"\n', "exclusive"),
        ("[ingest]\nbatch_max = 1.5\n", "ingest.batch_max must be int, got float"),
        ('[metering]\nmax_power_w_slot = "3000"\n', "metering.max_power_w_slot must be int"),
        ("[dashboard]\nport = true\n", "dashboard.port must be int, got bool"),
        ('[carbon]\nparam = "x"\n', "unknown key carbon.param"),
        ("db = 3\n", "[db] must be a table"),
        ("[broker]\nuser = 7\n", "broker.user must be str"),
        ("[cluster]\nshards = 2\n", "needs a PostgreSQL database"),
        ('[db]\nurl = "postgresql://h/d"\n[cluster]\nshards = 0\n', "shards must be 1..256"),
        ('[broker]\nshare_group = "agents"\n', "unknown key broker.share_group"),
    ],
)
def test_bad_config_names_the_key(tmp_path: pathlib.Path, text: str, needle: str) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(text)
    (tmp_path / "pw").write_text("x")
    with pytest.raises(ConfigError) as ei:
        load_config(cfg)
    assert needle in str(ei.value)


def test_agent_command_bad_config_exits_2(tmp_path: pathlib.Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text("[broker]\nprot = 1\n")
    r = subprocess.run(
        [*STATIONCTL, "agent", "--config", str(cfg)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 2 and "unknown key broker.prot" in r.stderr
    r = subprocess.run(
        [*STATIONCTL, "agent", "--config", str(tmp_path / "none.toml")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 2 and "cannot read" in r.stderr


def test_config_is_read_without_the_service() -> None:
    """Commands that read a config (verify, keys, flash) load agent.config, not the whole
    service with its MQTT source and threads."""
    code = (
        "import sys, agent.config, stationctl.verify, stationctl.keys, stationctl.flash; "
        "sys.exit('agent.service' in sys.modules)"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=60, check=False)
    assert r.returncode == 0


def test_health_section(tmp_path: pathlib.Path) -> None:
    p = tmp_path / "agent.toml"
    p.write_text("[db]\n")
    assert load_config(p).health is None  # none unless asked for
    p.write_text('[health]\nhost = "0.0.0.0"\nport = 9200\n')
    c = load_config(p)
    assert c.health is not None and (c.health.host, c.health.port) == ("0.0.0.0", 9200)
    p.write_text("[health]\n")
    c = load_config(p)
    assert c.health is not None and (c.health.host, c.health.port) == ("127.0.0.1", 9108)
    for text, needle in (
        ("[health]\nprot = 1\n", "unknown key health.prot"),
        ('[health]\nport = "9108"\n', "health.port must be int"),
        ("[health]\nhost = 1\n", "health.host must be str"),
    ):
        p.write_text(text)
        with pytest.raises(ConfigError, match=needle):
            load_config(p)
