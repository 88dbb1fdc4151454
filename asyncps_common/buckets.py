"""Histogram buckets that the servers' and the workers' latency metrics share.

Both sides time the same pull and push RPCs (`asyncps_server_pull_duration_seconds`,
`asyncps_worker_pull_duration_seconds`, ...), so they use one set of buckets and a
dashboard can set their quantiles side by side.
"""

# Seconds for one pull or push RPC, fitted to a default ps-cluster run measured on the 2-core VM
# (1000 iterations, 2 servers, 2 workers, s=0 with averaging; docs/deploy.md, "Metrics"):
# per-shard pulls 7 ms (p10) .. 17 ms (p50) .. 0.1 s (p99) .. 0.2 s (max), most of it waiting for the
# other worker's push; pushes 5 .. 9 .. 26 .. 52 ms; with s=2 and no averaging both stay under 52 ms.
# Dense from 1 ms to 0.25 s, then sparse up to 30 s for a 64 MB shard (~0.1 s) or a straggler.
LATENCY_BUCKETS = (
    0.001,
    0.002,
    0.004,
    0.006,
    0.008,
    0.012,
    0.016,
    0.025,
    0.035,
    0.05,
    0.075,
    0.1,
    0.15,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
