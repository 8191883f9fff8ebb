"""The cost of the driver's TCP channels (for Ray actors) beside the Unix sockets (local workers).

Two measurements, each alternating the transports ``--repeats`` times in this one process (the
parent's listener threads share its GIL with the caller, as in a worker they do not: an upper
bound on the caller's cost):

- ``log``: microseconds per ``logger.warning`` in the caller through procval's relay handler
  (Unix datagram, one send per record, queued for a thread while the socket is full; TCP, a
  bounded queue sent in batches by a thread), and
  how many records reached the parent's handler or were dropped;
- ``permit``: microseconds per permit (``with procval.worker.limited.limited(key)``: acquire,
  answer, release) of an unlimited key, one thread, to the parent's rate limiter.

    PYTHONPATH=$PWD python benchmarks/channels.py [--records 20000] [--permits 2000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import logging
import time

from procval.ratelimit import RateLimit
from procval.run.limiter import Limiter
from procval.run.logs import LogListener
from procval.worker import limited
from procval.worker.logs import RelayHandler


class _Count(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.n += 1


def log_cost(target: str, records: int) -> tuple[float, int, int]:
    """``(µs per record in the caller, records received, records dropped)``."""
    counted = _Count()
    parent = logging.getLogger("bench.channels")  # where the listener re-emits the records
    parent.propagate, parent.handlers = False, [counted]
    relay = RelayHandler(target)
    source = logging.Logger("bench.channels", logging.INFO)  # the worker's logger, unregistered
    source.addHandler(relay)
    start = time.perf_counter()
    for i in range(records):
        source.warning("record %d of the benchmark", i)
    spent = time.perf_counter() - start
    relay.flush()
    deadline = time.monotonic() + 10
    while counted.n + _dropped(relay) < records and time.monotonic() < deadline:
        time.sleep(0.01)
    relay.close()
    parent.handlers = []
    return spent / records * 1e6, counted.n, _dropped(relay)


def _dropped(relay: RelayHandler) -> int:
    return relay.dropped + relay._lost()


def permit_cost(target: str, permits: int) -> float:
    """µs per permit, one thread."""
    limited.install("bench", (RateLimit("k"),), target)
    start = time.perf_counter()
    for _ in range(permits):
        with limited.limited("k"):
            pass
    spent = time.perf_counter() - start
    limited.install("", (), "")
    return spent / permits * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=20000)
    parser.add_argument("--permits", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    listener = LogListener()
    tcp_log = listener.open_tcp("127.0.0.1")
    limiter = Limiter({"k": RateLimit("k")})
    tcp_limiter = limiter.open_tcp("127.0.0.1")
    best: dict[str, list[float]] = {}
    try:
        for _ in range(args.repeats):
            for name, target in (("unix", listener.path), ("tcp", tcp_log)):
                cost, got, dropped = log_cost(target, args.records)
                best.setdefault(f"log {name}", []).append(cost)
                print(f"log    {name:4}  {cost:6.2f} µs/record  {got} received  {dropped} dropped")
            for name, target in (("unix", limiter.path), ("tcp", tcp_limiter)):
                cost = permit_cost(target, args.permits)
                best.setdefault(f"permit {name}", []).append(cost)
                print(f"permit {name:4}  {cost:6.1f} µs/permit")
    finally:
        limiter.stop()
        listener.stop()
    for what in ("log", "permit"):
        unix, tcp = min(best[f"{what} unix"]), min(best[f"{what} tcp"])
        print(f"best {what:6}: unix {unix:.2f} µs, tcp {tcp:.2f} µs, tcp/unix {tcp / unix:.2f}x")


if __name__ == "__main__":
    main()
