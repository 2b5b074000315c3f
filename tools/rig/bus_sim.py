"""The Modbus devices (grid meter, one BMS per slot) as a real pymodbus 3.16 RTU server.

pymodbus' SimDevice/SimData (the replacement of the deprecated device context) hold the
register layout; each device's `action` hook runs before a read is answered and fills the
registers from the model at that instant, so values are computed on demand. A BMS whose
slot is empty raises NoSuchIdException in its action, and with
`ignore_missing_devices=True` the server then sends nothing: the master times out, as on
a real bus. (The relay already drops requests for absent units; this is the second line.)
"""

from __future__ import annotations

from pymodbus.constants import ExcCodes
from pymodbus.exceptions import NoSuchIdException
from pymodbus.framer import FramerType
from pymodbus.server import ModbusSerialServer
from pymodbus.simulator import DataType, SimAction, SimData, SimDevice

from .model import BMS_UNIT_BASE, METER_INPUT_REGS, METER_UNIT, RigModel


def _bms_action(model: RigModel, slot: int) -> SimAction:
    async def action(
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        registers: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        regs = model.bms_registers(slot)
        if regs is None:
            raise NoSuchIdException(f"slot {slot} is empty")
        if set_values is not None:
            return ExcCodes.ILLEGAL_FUNCTION
        registers[0 : len(regs)] = regs
        return None

    return action


def _meter_action(model: RigModel) -> SimAction:
    async def action(
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        registers: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        if set_values is not None:
            return ExcCodes.ILLEGAL_FUNCTION
        if function_code == 4:
            regs = model.meter_input_registers(address, count)
        else:
            regs = model.meter_holding_registers()
        registers[0 : len(regs)] = regs
        return None

    return action


def build_devices(model: RigModel) -> list[SimDevice]:
    devices: list[SimDevice] = []
    if model.has_meter:
        nobits = SimData(0, values=False, datatype=DataType.BITS)
        devices.append(
            SimDevice(
                id=METER_UNIT,
                simdata=(
                    [nobits],
                    [SimData(0, values=False, datatype=DataType.BITS)],
                    [SimData(0xFC00, count=2, datatype=DataType.REGISTERS, readonly=True)],
                    [
                        SimData(
                            0, count=METER_INPUT_REGS, datatype=DataType.REGISTERS, readonly=True
                        )
                    ],
                ),
                action=_meter_action(model),
            )
        )
    for slot in range(1, model.slots + 1):
        devices.append(
            SimDevice(
                id=BMS_UNIT_BASE + slot,
                simdata=[SimData(0, count=14, datatype=DataType.REGISTERS, readonly=True)],
                action=_bms_action(model, slot),
            )
        )
    return devices


def make_server(model: RigModel, port: str, baud: int) -> ModbusSerialServer:
    """Construct inside the event loop that will run it (pymodbus takes the running loop)."""
    return ModbusSerialServer(
        build_devices(model),
        framer=FramerType.RTU,
        port=port,
        baudrate=baud,
        ignore_missing_devices=True,
    )
