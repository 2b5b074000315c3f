# Per-slot battery-side energy register: trapezoid integration of charger mV x mA samples in
# integers only, with the remainder carried so that no energy is lost to rounding.
#
# Units. mV x mA = uW; uW x ms = uW.ms; 1 mWh = 3.6e9 uW.ms. The trapezoid of one interval is
# (p0 + p1) * dt / 2, so the exact running sum kept is Q = sum (p0 + p1) * dt, whose unit is
# half a uW.ms: 1 mWh = 7.2e9 of them. mwh = floor(Q / 7.2e9); the remainder Q mod 7.2e9 is
# carried to the next sample (and can be persisted: `rem`).
#
# Small ints. MicroPython on the ESP32 boxes integers beyond +-2**30 on the heap, and
# 84,000 mV x 15,000 mA = 1.26e9 uW already is one. So powers are split into mW and a uW part
# (mv is split into V and a mV rest first), the remainder into two fields (rh: units of
# 1000 half-uW.ms; rl: 0..999) and the register into _hi * 1e9 + _lo. Every intermediate then
# stays below 2**30 for mv, |ma| <= 200,000 (the charger parser's limits) and dt <= 60,000 ms;
# beyond that Python's ints stay exact and merely allocate. bench/bench_energy.py measures
# gc.mem_alloc() per sample. Reading `mwh` or `rem` allocates once either is past 2**30.
# `up_ms` itself (uptime, never wrapping) passes 2**30 after 12.4 days: from then on the one
# subtraction up_ms - last_up allocates a temporary whose small result is then unboxed
# (measured: 64 bytes per call, else 0; the naive one-big-int form allocates on every call).
try:
    from micropython import const
except ImportError:  # CPython

    def const(x):  # type: ignore[no-redef,misc]
        return x


_LO_MAX = const(1000000000)  # register split: mwh = _hi * _LO_MAX + _lo
_RH_PER_MWH = const(7200000)  # one mWh in units of 1000 half-uW.ms
_MW_PER_7200 = const(7200)


class SlotEnergy:
    """One slot's monotonic energy register in mWh.

    sample(up_ms, mv, ma) integrates the trapezoid between the previous good sample and this
    one over the measured time. A missed or bad charger reading is not a sample: the next
    good one bridges it. A gap longer than stale_ms is not integrated (the register does not
    move for it) and sample() returns its length in ms so the caller can raise an alarm.

    Power is clamped at 0 per sample (ma < 0 is discharge, mv <= 0 nonsense): the register
    counts energy delivered into the battery and never goes down. The metering rules treat
    any decrease as an anomaly (CONTRACT §6), and a battery discharging into the charger
    (or a sensor offset around 0 A) must not erase energy already counted.

    Sampling error of the trapezoid rule (rounding adds none: the remainder is carried,
    and at any moment the register lags the exact sum by less than 1 mWh). With sampling
    period h and a true power p(t):
      - where p is twice differentiable, the error over a span T is at most
        T * h**2 * max|p''| / 12 (per interval: h**3 * |p''(xi)| / 12);
      - an interval holding a kink of p (a jump of the slope by dp', e.g. the CC -> CV
        change) adds at most h**2 * |dp'| / 8;
      - an interval holding a step of p by dP (charger switching on or off between two
        samples) adds at most h * |dP| / 2: at h = 1 s and 1.26 kW that is 175 mWh, once
        per step, against a session of about 2 kWh;
      - power crossing 0 inside an interval (charge -> discharge) is clamped only at the
        samples: at most h * max|p| / 2 for that interval.
    The bound is on the sampled curve: ripple faster than the sampling (charger PWM,
    ~kHz) is averaged by the charger's own measurement, not by this integration."""

    def __init__(self, mwh=0, stale_ms=10000, rem=0):
        if mwh < 0 or stale_ms <= 0 or rem < 0 or rem >= 7200000000:
            raise ValueError("need mwh >= 0, stale_ms > 0, 0 <= rem < 7.2e9")
        self._hi, self._lo = divmod(mwh, _LO_MAX)
        self._rh, self._rl = divmod(rem, 1000)
        self.stale_ms = stale_ms
        self.last_up = None  # uptime of the last good sample, None before the first
        self._pm = 0  # last sample's power: mW part
        self._pu = 0  # and its uW rest, 0..999

    @property
    def mwh(self):
        """The register, mWh (an int; allocated only past 2**30 mWh = 1,074 MWh)."""
        return self._hi * _LO_MAX + self._lo if self._hi else self._lo

    @property
    def powered(self):
        """True when the last good sample drew power (so a gap after it may hide energy)."""
        return self._pm > 0 or self._pu > 0

    @property
    def rem(self):
        """Energy carried below 1 mWh, in half-uW.ms: 0 <= rem < 7.2e9."""
        return self._rh * 1000 + self._rl

    def sample(self, up_ms, mv, ma):
        """Add a good sample taken at uptime up_ms. Returns 0, or the length in ms of a gap
        longer than stale_ms that was left unmetered (the register did not move for it)."""
        # power in uW = pm * 1000 + pu, clamped at 0; mv = 1000 * vh + vl keeps products small
        if mv > 0 and ma > 0:
            x = (mv % 1000) * ma
            pm = (mv // 1000) * ma + x // 1000
            pu = x % 1000
        else:
            pm = 0
            pu = 0
        last = self.last_up
        self.last_up = up_ms
        p0m = self._pm
        p0u = self._pu
        self._pm = pm
        self._pu = pu
        if last is None:
            return 0
        dt = up_ms - last
        if dt < 0:
            self.last_up = last
            self._pm = p0m
            self._pu = p0u
            raise ValueError("uptime went backwards")
        if dt > self.stale_ms:
            return dt
        # Q += (S * 1000 + U) * dt, S in mW, U in uW; S = 7200 a + b so that S * dt needs no big int
        x = self._rl + (p0u + pu) * dt
        self._rl = x % 1000
        s = p0m + pm
        k = (s // _MW_PER_7200) * dt
        rh = self._rh + (k % 1000) * _MW_PER_7200 + (s % _MW_PER_7200) * dt + x // 1000
        add = k // 1000 + rh // _RH_PER_MWH
        self._rh = rh % _RH_PER_MWH
        if add:
            lo = self._lo + add
            if lo >= _LO_MAX:
                self._hi += lo // _LO_MAX
                lo %= _LO_MAX
            self._lo = lo
        return 0
