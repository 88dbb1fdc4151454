"""What the parameter servers (`ps_server`) and the workers (`worker`) both use.

Typed command-line flags whose defaults come from `ASYNCPS_*` environment variables
(`flags`), token and TLS (`security`), the `/metrics` HTTP endpoint (`metrics_http`) and
its shared histogram buckets (`buckets`), and the optimizer configuration the first
worker sends and the servers run (`optimizer`). It imports neither side: `worker`
imports `ps_server` only where it starts or embeds a server (tests/unit/test_imports.py).
"""
