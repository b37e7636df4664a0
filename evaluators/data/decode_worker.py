"""Decode a share of an image folder into the cache file: `python -m hwnas.evaluators.data.decode_worker`.

A plain subprocess rather than multiprocessing: spawn re-runs the caller's main script in every
child (a researcher's script without an `if __name__ == "__main__"` guard would start its sweep
again), and fork copies a driver that may hold threads (Ray, the MLflow client) in the middle of a
lock. The job arrives as JSON on stdin; stdout gets one line per item, in order; a file that does
not decode is one line on stderr and exit status 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from hwnas.evaluators.data.base import DataError
from hwnas.evaluators.data.image_folder import decode_file


def main() -> int:
    """Write each image of the job into rows start.. of the cache file, printing "." per image."""
    job = json.loads(sys.stdin.read())
    root, start = Path(job["root"]), int(job["start"])
    out = np.load(job["x_path"], mmap_mode="r+", allow_pickle=False)
    try:
        for i, name in enumerate(job["names"]):
            out[start + i] = decode_file(root / name, name, job["resolution"], job["channels"], job["resize"])
            print(".")
    except DataError as exc:
        print(str(exc), file=sys.stderr, flush=True)
        return 2
    out.flush()
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
