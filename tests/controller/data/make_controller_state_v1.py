"""How controller_state_v1.pt was made: a controller state written by the code of commit 9dcee47 (before budget
sizing and presets) after 41 steps, and what that code did in the 60 steps after it.

    mkdir -p /tmp/old/oldatesd/controller && touch /tmp/old/oldatesd/__init__.py
    for f in __init__ base baselines beta reward; do
        git show 9dcee47:controller/$f.py | sed 's/from atesd\\.controller/from oldatesd.controller/g' \\
            > /tmp/old/oldatesd/controller/$f.py
    done
    cd /tmp/old && PYTHONPATH=/tmp/old python <checkout>/tests/controller/data/make_controller_state_v1.py \\
        <checkout>/tests/controller/data/controller_state_v1.pt
"""

import math
import sys

import torch
from oldatesd.controller import BetaExposureController, RandomExposure  # the old code, renamed


def stats(t: int, a: float) -> dict[str, float]:
    loss = 3.0 - 0.004 * t * (1 - a) + 0.05 * math.sin(1.3 * t)
    return {"loss": loss, "mismatch": 0.1 + 0.2 * a, "confidence": 0.5, "credit": -1.0 + 0.1 * a + 0.01 * math.cos(t),
            "progress": min(1.0, (t + 1) / 120)}


def drive(p, start: int, steps: int) -> list[float]:
    out = []
    for t in range(start, start + steps):
        a = p.exposure()
        out.append(a)
        p.observe(stats(t, a))
    return out


if __name__ == "__main__":
    p, r = BetaExposureController(seed=5), RandomExposure(seed=5)
    drive(p, 0, 41)  # mid-window (41 % 4 == 1), decisions pending and scored
    drive(r, 0, 41)
    state = {"adaptive": p.state_dict(), "random": r.state_dict()}
    state["adaptive_next"], state["random_next"] = drive(p, 41, 60), drive(r, 41, 60)
    state["adaptive_history"] = [dict(h) for h in p.history]
    state["adaptive_net"] = {k: v.clone() for k, v in p.net.state_dict().items()}
    torch.save(state, sys.argv[1])
