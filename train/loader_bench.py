"""Input-pipeline benchmark: images per second of the training loader alone (no model, no device).

    python -m train.loader_bench --data DIR [--resolution 512] [--batch-size 16] [--steps 20] \
        [--workers 0,1,2] [--random-crop] [--flip]

Reads `--steps` optimizer steps of `--batch-size` images each (decoded, resized, cropped, flipped, scaled
to [-1, 1], token ids attached) exactly as `python -m train` would feed them, with the reader of
`train.loader` for each worker count, after one warm-up step, and prints images/s. Set it against the
step's need: a chip that trains S steps/s at batch B consumes S * B images/s. Informational: nothing here
is a test.
"""

from __future__ import annotations

import argparse
import time

from sdjax import testing
from train import loader, model
from train.config import Images, Optim, TrainConfig
from train.data import Batches, scan_folder


def images_per_second(
    data: str, resolution: int, batch: int, steps: int, workers: int, crop: bool, flip: bool
) -> float:
    config = TrainConfig(
        model="random:tiny",  # a label: only its tokenizer is used
        images=Images(resolution=resolution, center_crop=not crop, random_flip=flip, loader_workers=workers),
        optim=Optim(batch_size=batch, steps=steps + 1),
    )
    setup = model.make_setup(config, testing.random_pipeline("tiny"))
    batches = Batches(setup, scan_folder(data), [], 1, process_index=0, process_count=1)
    stream = loader.steps(batches.step, 0, steps + 1, workers)
    next(stream)  # warm-up: worker start-up, first decode
    start = time.perf_counter()
    count = sum(1 for _ in stream)
    return count * batch / (time.perf_counter() - start)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.loader_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="image folder or tar shards (as python -m train --data)")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--workers", default="0,1,2", help="comma-separated worker counts (0: one thread)")
    p.add_argument("--random-crop", action="store_true")
    p.add_argument("--flip", action="store_true")
    args = p.parse_args(argv)
    for workers in (int(w) for w in args.workers.split(",")):
        rate = images_per_second(
            args.data, args.resolution, args.batch_size, args.steps, workers, args.random_crop, args.flip
        )
        print(f"workers {workers}: {rate:7.1f} images/s ({args.resolution}x{args.resolution}, batch {args.batch_size})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
