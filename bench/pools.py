"""Celery worker pools for qbgw's I/O-bound work: threads and prefork, beside the minimal task.

One ``qbgw worker`` process (``--pool P --concurrency C``) drains ``--jobs`` jobs against the gateway
emulator answering after ``--latency`` s, exactly as ``bench.throughput``'s part 1 does (PostgreSQL
scratch database, private Redis), for each ``--variants`` entry ``pool:concurrency``. Beside each: its
ideal (C / latency), and the minimal hand-written task (threads, 32) timed in the same run. Worker CPU
and resident memory count the worker process and its children (prefork's pool processes).

Correctness: every job of every burst must succeed, and the audit chain must verify (``verify_log``,
what ``qbgw audit verify`` runs) after all bursts; the run fails otherwise.

gevent is no longer a variant: the worker refuses it (``worker.settings.GEVENT_REFUSED``, measured here at
14.8 jobs/s against 110 for threads before the refusal, commit c7bcbb4).

    .venv/bin/python -m bench.pools                                   # 2000 jobs x 3 reps, ~15 min
    .venv/bin/python -m bench.pools --variants threads:32,prefork:32 --jobs 500 --reps 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from bench.throughput import Config, Results, Workers, bench_environment, minimal_burst, pipeline_burst, rss_bytes
from qbgw.admin import verify_log

DEFAULT_VARIANTS = "threads:32,prefork:8,prefork:16,prefork:32"


@dataclass(frozen=True)
class Variant:
    pool: str
    concurrency: int

    @property
    def name(self) -> str:
        return f"{self.pool} -c {self.concurrency}"


def parse_variants(spec: str) -> list[Variant]:
    variants = []
    for item in spec.split(","):
        pool, _, concurrency = item.strip().partition(":")
        if pool not in ("threads", "prefork", "solo") or not concurrency.isdigit():
            raise argparse.ArgumentTypeError(f"not pool:concurrency: {item!r}")
        variants.append(Variant(pool, int(concurrency)))
    return variants


def run(
    config: Config, variants: Sequence[Variant], say: Callable[[str], None] = print
) -> tuple[Results, dict[str, list[int]]]:
    """Each variant and the minimal task ``config.reps`` times, interleaved; returns the bursts and the
    peak resident memory each variant's worker had at the end of its bursts."""
    results, memory = Results(), {v.name: [] for v in variants}
    with bench_environment(config, say, "qbgw-pools-") as bench:
        settings = bench.settings
        for rep in range(1, config.reps + 1):
            burst = minimal_burst(bench)
            results.add("minimal", burst)
            say(f"  rep {rep} {'minimal (threads -c 32)':22} {burst.line()}")
            for variant in variants:
                seen: list[int] = []

                def sample(fleet: Workers, seen: list[int] = seen) -> None:
                    seen.append(rss_bytes(fleet.procs[0].pid))

                chosen = settings.with_(pool=variant.pool, concurrency=variant.concurrency)
                burst = pipeline_burst(bench, chosen, on_end=sample)
                results.add(variant.name, burst)
                memory[variant.name] += seen
                say(f"  rep {rep} {variant.name:22} {burst.line()}, worker RSS {seen[0] / 2**20:.0f} MiB")
        report = verify_log(reader="bench.pools", settings=settings)
        say(
            f"  audit chain after all bursts: {report.events} events, "
            f"{'intact' if report.ok else 'BROKEN: ' + str(report.problem)}"
        )
        if not report.ok:
            raise RuntimeError(f"the audit chain does not verify: {report.problem}")
    failed = {name: sum(b.failed for b in bursts) for name, bursts in results.bursts.items()}
    if any(failed.values()):
        raise RuntimeError(f"jobs that did not succeed: {failed}")
    return results, memory


def table(config: Config, variants: Sequence[Variant], results: Results, memory: dict[str, list[int]]) -> list[str]:
    minimal, cpu_min = results.rate("minimal"), results.cpu_ms("minimal")
    rows = [("pool", "jobs/s", "ideal", "of ideal", "of minimal", "CPU ms/job", "RSS MiB")]
    rows.append(
        (
            f"minimal task, threads -c {config.concurrency}",
            f"{minimal or 0:.1f}",
            f"{config.ideal:.0f}",
            f"{(minimal or 0) / config.ideal:.2f}",
            "1.00",
            f"{cpu_min or 0:.2f}",
            "-",
        )
    )
    for v in variants:
        rate, cpu = results.rate(v.name) or 0.0, results.cpu_ms(v.name) or 0.0
        ideal = v.concurrency / config.latency
        rss = statistics.median(memory[v.name]) / 2**20 if memory[v.name] else 0.0
        rows.append(
            (
                f"qbgw, {v.name}",
                f"{rate:.1f}",
                f"{ideal:.0f}",
                f"{rate / ideal:.2f}",
                f"{rate / minimal:.2f}" if minimal else "-",
                f"{cpu:.2f}",
                f"{rss:.0f}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [" | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--variants",
        type=parse_variants,
        default=parse_variants(DEFAULT_VARIANTS),
        help=f"pool:concurrency, comma-separated (default {DEFAULT_VARIANTS})",
    )
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args(argv)
    config = Config(jobs=args.jobs, reps=args.reps, latency=args.latency, timeout=args.timeout)
    started = time.monotonic()
    print(
        f"{args.jobs} jobs per burst, upstream {args.latency:g}s, medians of {args.reps}; "
        f"machine: {os.cpu_count()} CPUs, shared with other work",
        flush=True,
    )
    results, memory = run(config, args.variants, say=lambda line: print(line, flush=True))
    print()
    print("\n".join(table(config, args.variants, results, memory)))
    print(f"\nwhole run {time.monotonic() - started:.0f}s")


if __name__ == "__main__":
    main()
