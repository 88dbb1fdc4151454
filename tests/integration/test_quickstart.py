"""README's quickstart runs as written against two real servers and trains them.

The python block between `<!-- quickstart:begin -->` and `<!-- quickstart:end -->` is
extracted verbatim; only its two addresses (127.0.0.1:50051 / :50052) are replaced with
those of two servers started on free ports. It runs as its own process and must exit 0;
then each shard's Status shows 50 applied updates (the snippet's 50 steps), the plan of
the snippet's model, and weights that moved away from the model's initial ones.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest
import torch

from worker import PSClient
from worker.plan import make_plan, param_specs

from .support import FAST_FAIL, status, wait_exit

pytestmark = pytest.mark.slow  # real clusters or long runs: left out of the quick loop (-m "not slow")

ROOT = Path(__file__).resolve().parents[2]
ADDRESSES = ("127.0.0.1:50051", "127.0.0.1:50052")
STEPS = 50


def quickstart_code() -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- quickstart:begin -->\s*```python\n(.*?)```\s*<!-- quickstart:end -->", text, re.S)
    assert m, "README.md has no python block between the quickstart markers"
    return m.group(1)


def prelude_namespace(code: str) -> dict:
    """Run the snippet's statements before its first `with` (imports, seed, model, data) here."""
    tree = ast.parse(code)
    first_with = next(i for i, node in enumerate(tree.body) if isinstance(node, ast.With))
    namespace: dict = {}
    exec(compile(ast.Module(body=tree.body[:first_with], type_ignores=[]), "<quickstart>", "exec"), namespace)
    return namespace


def test_readme_quickstart_trains_two_shards(start_server, procs, tmp_path):
    code = quickstart_code()
    for a in ADDRESSES:
        assert code.count(a) == 1, f"the quickstart should name {a} once"
    servers = start_server.shards(2)
    for a, s in zip(ADDRESSES, servers):
        code = code.replace(a, s.address)

    log = tmp_path / "quickstart.log"
    with open(log, "wb") as out:
        proc = procs.popen([sys.executable, "-c", code], stdout=out, stderr=out, cwd=tmp_path)
    assert wait_exit(proc, 120, log) == 0, log.read_text()[-3000:]

    model = prelude_namespace(code)["model"]
    initial = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    plan = make_plan(param_specs(model.named_parameters()), 2)
    for s, shard in zip(servers, plan.shards):
        st = status(s.address)
        assert st.version == STEPS and st.pushes_applied == STEPS and st.pushes_rejected == 0
        assert st.plan_hash == plan.hash and st.numel == shard.numel
        assert st.optimizer.name == "adamw" and st.staleness == 2
        assert st.live_workers == 0  # the snippet's `with` left cleanly
        assert abs(st.weights_checksum - float(initial[shard.lo : shard.hi].double().abs().sum())) > 1e-3

    with PSClient([s.address for s in servers], model, staleness=2, worker_id="inspector", options=FAST_FAIL) as ps:
        assert ps.clock == STEPS
        ps.pull()
    trained = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert (trained - initial).abs().max() > 1e-2, "the weights did not move from the initial ones"
