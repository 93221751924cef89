"""Child process of the peak-memory measurement: `python -m benchmarks.memory METHOD SHAPE`.

Builds the method (model, batch, hash tables, projections), then runs one batch and
prints the peak resident memory above the level just before that call, as JSON.
"""

from __future__ import annotations

import json
import sys

import torch

from benchmarks.common import Shape, rss_kib
from benchmarks.methods import METHODS, Infeasible


def main() -> None:
    method, shape_json = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    shape = Shape(**json.loads(shape_json))
    try:
        run = METHODS[method](shape)
    except Infeasible as error:
        print(json.dumps({"infeasible": str(error)}))
        return
    before = rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # reset the peak (VmHWM) to the current resident size
    run()
    peak = rss_kib("VmHWM") - before
    print(json.dumps({"peak_mib": peak / 1024, "per_example_kib": peak / (2 * shape.batch)}))


if __name__ == "__main__":
    main()
