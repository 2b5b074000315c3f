# Register maps of the grid meter (CONTRACT 4.1) and the battery BMS (4.2), and their
# decoding into integers. No float arithmetic anywhere: the ESP32's floats are 32-bit, so
# the meter's IEEE-754 float32 registers are converted from their bits.
try:
    from micropython import const
except ImportError:  # CPython

    def const(x):  # type: ignore[no-redef,misc]
        return x


# function 04 input registers, float32 big-endian (2 registers each)
METER_MODELS = {
    "sdm630": {"power": 0x0034, "energy": 0x0048},
    "sdm120": {"power": 0x000C, "energy": 0x0048},
}
METER_SN = const(0xFC00)  # holding register (function 03), u32 high word first

# Bus time: one read spanning power and energy costs 2 bytes per register in between;
# two reads cost a second request (8), reply header + CRC (5), turnaround and 3.5 chars of
# silence, ~20 characters plus the device's latency. So the two are read in one
# transaction when they lie within _MERGE_SPAN registers of each other, else in two.
# (SDM630: 0x34..0x49 is 22 registers -> two reads; SDM120 too.)
_MERGE_SPAN = const(16)

BMS_REGS = const(14)

# CONTRACT §2 ranges of what the station reads from the bus and sends. A value outside its
# range is a bad reading (BadReading): counted, and its source omitted from telemetry.
E_WH_MAX = 100000000000  # meter.e_wh: 10^8 kWh (CONTRACT §4.1); a long int on the ESP32, made once
P_W_MAX = const(10000000)  # |meter.p_w|
SOC_MAX = const(1000)  # soc, soh (0.1 %)
T_MIN = const(-1000)  # t, tmin (0.1 °C)
T_MAX = const(2000)
# Every other field is in range by its type: a u32 serial (sn 0..2^32 - 1), BMS mv (u16 x 10)
# and ma (s16 x 10), cyc and flt (u16), life_wh (u32 <= 10^11).


class BadReading(ValueError):
    """A reply that arrived intact but holds no valid reading: a meter float that is NaN,
    infinite, negative energy or outside its CONTRACT §2 range, a BMS field outside its
    range or a serial that is not 8 characters of [0-9A-Za-z-]. The message names the field."""


def _f32_scaled(hi, lo, mul):
    # value * mul rounded to nearest (ties toward +inf), or None for NaN/inf.
    # float32: sign(1) exponent(8) mantissa(23); value = m * 2**(e - 150) with the
    # implicit bit for normal numbers, m * 2**-149 for subnormals.
    if not 0 <= hi <= 0xFFFF or not 0 <= lo <= 0xFFFF:
        raise ValueError("registers are 16-bit")
    e = (hi >> 7) & 0xFF
    m = ((hi & 0x7F) << 16) | lo
    if e == 0xFF:
        return None  # inf or NaN
    if e == 0:
        e = 1  # subnormal: no implicit bit, same scale as the smallest normal
    else:
        m |= 0x800000
    if m == 0:
        return 0  # +0.0 and -0.0
    m *= mul
    if hi & 0x8000:
        m = -m
    e -= 150
    if e >= 0:
        return m << e
    if e < -36:
        return 0  # |m * mul| < 2**34 <= 2**(-e - 2): the value is below 1/2, rounds to 0
    return (m + (1 << (-e - 1))) >> (-e)  # floor(x + 1/2); >> floors negatives too


def f32_kwh_to_wh(hi, lo):
    """IEEE-754 float32 kWh (hi word first) -> int Wh, rounded to nearest, ties up.
    NaN, +-inf and negative values -> None (a bad reading). -0.0 is 0."""
    if hi & 0x8000 and (hi & 0x7FFF or lo):
        return None  # negative (or a negative NaN)
    return _f32_scaled(hi, lo, 1000)


def f32_to_int(hi, lo):
    """IEEE-754 float32 (hi word first) -> int, rounded to nearest with ties toward +inf
    (2.5 -> 3, -2.5 -> -2). NaN, +-inf -> None."""
    return _f32_scaled(hi, lo, 1)


def meter_map(model):
    """(power, energy) register addresses of a model name or a config dict."""
    if isinstance(model, str):
        m = METER_MODELS.get(model)
        if m is None:
            raise ValueError("unknown meter model " + model)
    elif isinstance(model, dict):
        m = model
    else:
        raise ValueError("meter model must be a name or a dict")
    p = m.get("power")
    e = m.get("energy")
    for a in (p, e):
        if not isinstance(a, int) or not 0 <= a <= 0xFFFE:
            raise ValueError("meter register address must be 0..65534")
    return p, e


def _f32_huge(hi):
    """True when |float32| >= 2^64 (or NaN/inf): far outside every range here, so the exact
    conversion, a long int of up to 140 bits, is not worth its allocation."""
    return (hi >> 7) & 0xFF >= 191


def _energy_wh(hi, lo):
    ew = None if _f32_huge(hi) else f32_kwh_to_wh(hi, lo)
    if ew is None or ew > E_WH_MAX:
        raise BadReading("meter e_wh")
    return ew


def _power_w(hi, lo):
    pw = None if _f32_huge(hi) else f32_to_int(hi, lo)
    if pw is None or not -P_W_MAX <= pw <= P_W_MAX:
        raise BadReading("meter p_w")
    return pw


async def read_meter(master, unit, model, out=None):
    """Read the meter's energy and power (function 04) -> {"e_wh": int, "p_w": int}
    (into out when given, to save the allocation; out is not touched by a failed read).
    Raises ModbusError from the bus and BadReading for a float that is not a reading (NaN,
    inf, negative energy, energy above 10^8 kWh, power beyond +-10^7 W)."""
    p, e = meter_map(model)
    lo = min(p, e)
    span = max(p, e) + 2 - lo
    if span <= _MERGE_SPAN:
        regs = await master.read_input(unit, lo, span)
        ew = _energy_wh(regs[e - lo], regs[e - lo + 1])
        pw = _power_w(regs[p - lo], regs[p - lo + 1])
    else:
        regs = await master.read_input(unit, e, 2)
        ew = _energy_wh(regs[0], regs[1])  # a bad energy spares the bus the power read
        regs = await master.read_input(unit, p, 2)
        pw = _power_w(regs[0], regs[1])
    if out is None:
        out = {}
    out["e_wh"] = ew
    out["p_w"] = pw
    return out


async def read_meter_sn(master, unit):
    """The meter's serial number: holding 0xFC00, u32 (function 03)."""
    regs = await master.read_holding(unit, METER_SN, 2)
    return (regs[0] << 16) | regs[1]


_sn = bytearray(8)  # scratch for the battery serial (decode_bms is not re-entered)


def _s16(v):
    return v - 0x10000 if v & 0x8000 else v


def decode_bms(regs, out=None):
    """14 BMS holding registers -> the telemetry `bat` dict (CONTRACT 5.2), into out when
    given; None when the serial is not 8 characters of [0-9A-Za-z-] (a bad reading)."""
    if len(regs) != BMS_REGS:
        raise ValueError("BMS reading is 14 registers")
    sn = _sn
    for k in range(4):
        r = regs[8 + k]
        sn[2 * k] = r >> 8
        sn[2 * k + 1] = r & 0xFF
    for k in range(8):  # range loops allocate nothing; iterating the bytearray would
        c = sn[k]
        if not (48 <= c <= 57 or 65 <= c <= 90 or 97 <= c <= 122 or c == 45):
            return None
    if out is None:
        out = {}
    out["id"] = sn.decode()
    out["soc"] = regs[0]
    out["soh"] = regs[1]
    out["mv"] = regs[2] * 10
    out["ma"] = _s16(regs[3]) * 10
    out["t"] = _s16(regs[4])
    out["tmin"] = _s16(regs[5])
    out["cyc"] = regs[6]
    out["flt"] = regs[7]
    out["life_wh"] = (regs[12] << 16) | regs[13]
    return out


def check_bms(regs):
    """Raise BadReading when a BMS field of the 14 registers is outside its CONTRACT §2
    range (soc, soh 0..1000; t, tmin -1000..2000); the others are in range by their type."""
    if regs[0] > SOC_MAX:
        raise BadReading("BMS soc")
    if regs[1] > SOC_MAX:
        raise BadReading("BMS soh")
    if not T_MIN <= _s16(regs[4]) <= T_MAX:
        raise BadReading("BMS t")
    if not T_MIN <= _s16(regs[5]) <= T_MAX:
        raise BadReading("BMS tmin")


async def read_bms(master, unit, count_timeout=True, out=None):
    """One read of 14 holding registers from 0 -> the `bat` dict (into out when given; out
    is not touched by a failed read). Raises ModbusError from the bus (Timeout uncounted
    when count_timeout is False) and BadReading for a field out of range or a bad serial."""
    regs = await master.read_holding(unit, 0, BMS_REGS, count_timeout)
    if len(regs) == BMS_REGS:
        check_bms(regs)
    bat = decode_bms(regs, out)
    if bat is None:
        raise BadReading("BMS serial is not 8 characters of [0-9A-Za-z-]")
    return bat
