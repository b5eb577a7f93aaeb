"""Host-side operators of one training step outside the network (issue #13; CPU, seconds).

Once the network's forward and backward replay from CUDA graphs, each remaining eager operator of a step costs
host time (a Python call and a kernel launch). This counts the ATen operators the teacher's objective
(:class:`rayflow.training.EpsilonObjective`), the timestep coefficients and RayFlow's VP-matched point (where its
student is evaluated, :func:`rayflow.schedulers.vp_matched`) dispatch per step, with the
network replaced by an identity, so the count is the objective's own. Counted with ``torch.profiler`` on the
CPU; on a GPU each of these is a kernel launch or a cheaper view op.

    python benchmarks/host_ops.py
"""

from __future__ import annotations

import collections
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from rayflow.schedulers import vp_matched  # noqa: E402
from rayflow.schedules import VPSchedule  # noqa: E402
from rayflow.training import EpsilonObjective  # noqa: E402


class _Identity(torch.nn.Module):
    prediction_type = "epsilon"

    def forward(self, x, t, c=None):  # noqa: D102 - the network's place in the step
        return x


def count_ops(fn) -> collections.Counter:
    from torch.profiler import ProfilerActivity, profile

    fn()  # warm (device tables, caches)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return collections.Counter(e.key for e in prof.key_averages() for _ in range(e.count)
                               if e.key.startswith("aten::"))


def main() -> int:
    sched = VPSchedule.linear()
    x = torch.randn(512, 1, 32, 32)
    labels = torch.arange(512) % 10
    objective = EpsilonObjective(x, labels, sched, 256, label_dropout=0.1, num_classes=10)
    net = _Identity()
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 1000, (256,))
    rows = {
        "teacher objective (EpsilonObjective), one call": count_ops(lambda: objective(net, 0, g)),
        "a(t) and s(t) at 256 integer timesteps": count_ops(lambda: (sched.a(t), sched.s(t))),
        "RayFlow's VP-matched point (vp_matched) at 256 integer timesteps": count_ops(lambda: vp_matched(sched, t)),
    }
    out = {what: {"aten_ops": sum(c.values()), "top": dict(c.most_common(8))} for what, c in rows.items()}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
