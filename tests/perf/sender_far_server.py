"""Benchmark: the sender into a server far away, with and without PIPELINING, same run.

``python -m tests.perf.sender_far_server`` (``make bench``). On loopback the SMTP server's own
time decides; a provider's server is milliseconds away, and then round trips do. Here every
byte between the sender and the sink takes ``BENCH_FAR_DELAY_MS`` (default 5, so a round trip
of 10 ms) through a delaying proxy (:class:`tests.support.tcp.TcpProxy`). Each round sends
``BENCH_FAR_MAILS`` (default 300) ~2 KB mails over one connection:

1. the bare ``smtplib`` loop of ``sender_throughput``, into the sink (no PIPELINING): MAIL,
   RCPT, DATA and the mail each wait for their reply, four round trips a mail;
2. the sender (one process, one connection) into the same sink;
3. the sender into a sink that offers PIPELINING (RFC 2920), as Postfix, Exchange, Microsoft
   365 and Gmail do: MAIL, RCPT and DATA go in one write, two round trips a mail.

Rates are taken at the sinks (first stored mail to last), each run against the bare loop of its
round; the median over ``BENCH_ROUNDS`` (default 2) rounds is printed.
"""

from __future__ import annotations

import os
import statistics
import sys

from tests.perf.sender_throughput import (
    MEMORY,
    USER,
    bare_run,
    prepare,
    setup,
    through_sender,
)

MAILS = int(os.environ.get("BENCH_FAR_MAILS", "300"))
DELAY = float(os.environ.get("BENCH_FAR_DELAY_MS", "5")) / 1000
ROUNDS = max(1, int(os.environ.get("BENCH_ROUNDS", "2")))


def main() -> None:
    from tests.lab.smtp_server import SmtpLab
    from tests.support.tcp import TcpProxy

    bench = setup("mailroom-bench-far-")
    settings, certs, secret = bench.settings, bench.certs, bench.secret
    mails = bench.mails(MAILS)
    rates: dict[str, list[float]] = {}
    with (
        SmtpLab(certs, {USER: secret}, "far", base=MEMORY) as plain,
        SmtpLab(certs, {USER: secret}, "far-pipelining", base=MEMORY, pipelining=True) as fast,
    ):
        proxies = {lab: TcpProxy(lab.port, delay=DELAY) for lab in (plain, fast)}
        for proxy in proxies.values():
            proxy.start()
        try:
            for _ in range(ROUNDS):
                bare = bare_run(plain, secret, certs.ca, mails, port=proxies[plain].port)
                rates.setdefault("bare", []).append(bare.rate)
                for name, lab in (("sender", plain), ("sender, PIPELINING", fast)):
                    prepare(settings, proxies[lab].port, secret)
                    run = through_sender(
                        bench.sender_env, 1, 1, settings.amqp_url, bench.work, lab, mails=MAILS
                    )
                    rates.setdefault(name, []).append(run.rate)
                    lab.clear()
        finally:
            for proxy in proxies.values():
                proxy.stop()
    print(
        f"mails: {MAILS} per run over one connection to an aiosmtpd sink {DELAY * 2000:.0f} ms"
        " away (round trip), STARTTLS + AUTH PLAIN"
    )
    print(f"  bare smtplib loop (no PIPELINING):   {statistics.median(rates['bare']):6.1f} mails/s")
    for name in ("sender", "sender, PIPELINING"):
        ratios = [run / bare for run, bare in zip(rates[name], rates["bare"], strict=True)]
        print(
            f"  {name + ':':<36}{statistics.median(rates[name]):6.1f} mails/s ="
            f" {statistics.median(ratios):4.0%} of the bare loop"
            f" ({', '.join(f'{r:.0%}' for r in ratios)})"
        )
    print(f"logs: {bench.work}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
