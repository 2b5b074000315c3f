import paho.mqtt.client as mqtt

from tools.mosquitto import Mosquitto


def test_private_broker_keeps_port_and_retained_message_across_restart(
    mosquitto: Mosquitto,
) -> None:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="t1")
    c.connect("127.0.0.1", mosquitto.port)
    c.loop_start()
    c.publish("stations/T-1/status", b"online", qos=1, retain=True).wait_for_publish(5)
    c.loop_stop()
    c.disconnect()
    mosquitto.restart()
    got: list[bytes] = []
    s = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="t2")
    s.on_message = lambda _c, _u, m: got.append(m.payload)
    s.connect("127.0.0.1", mosquitto.port)
    s.subscribe("stations/+/status", qos=1)
    s.loop_start()
    import time

    for _ in range(50):
        if got:
            break
        time.sleep(0.1)
    s.loop_stop()
    assert got == [b"online"]
