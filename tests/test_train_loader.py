"""The training input pipeline: WebDataset tar shards, grain worker processes, resuming and multi-host
splits all give the arrays of the one-thread reader of an image folder (train.data, train.loader)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_train import MICRO, make_squares

from sdjax import testing
from train import loader, model
from train.config import Images, Optim, TrainConfig
from train.data import Batches, DataError, load_image, scan_folder


@pytest.fixture(scope="module")
def squares(tmp_path_factory):
    return make_squares(tmp_path_factory.mktemp("squares"))  # four 72x80 images with metadata.jsonl


def write_shards(folder: Path, squares: Path) -> Path:
    """The squares as two WebDataset shards: captions in .txt in the first, in .json in the second."""
    folder.mkdir(parents=True, exist_ok=True)
    records = [json.loads(line) for line in (squares / "metadata.jsonl").read_text().splitlines()]
    for shard, part in enumerate((records[:2], records[2:])):
        with tarfile.open(folder / f"shard-{shard:05d}.tar", "w") as archive:
            for record in part:
                key = f"sample{Path(record['file_name']).stem}"
                caption = record["text"] if shard == 0 else json.dumps({"text": record["text"], "score": 1})
                for name, data in (
                    (f"{key}.png", (squares / record["file_name"]).read_bytes()),
                    (f"{key}.{'txt' if shard == 0 else 'json'}", caption.encode()),
                ):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
    return folder


def test_tar_shards_read_as_the_image_folder(squares, tmp_path):
    shards = write_shards(tmp_path / "shards", squares)
    folder_examples = scan_folder(squares)
    shard_examples = scan_folder(shards)
    assert [e.caption for e in shard_examples] == [e.caption for e in folder_examples]
    assert str(shard_examples[2].path) == f"{shards / 'shard-00001.tar'}:sample2.png"
    for a, b in zip(folder_examples, shard_examples, strict=True):
        for crop, flip in ((None, False), ((0.2, 0.9), True)):
            np.testing.assert_array_equal(load_image(a.path, 32, crop, flip), load_image(b.path, 32, crop, flip))
    assert [e.caption for e in scan_folder(shards / "shard-00000.tar")] == ["a red square", "a green square"]

    broken = tmp_path / "broken"
    broken.mkdir()
    with tarfile.open(broken / "a.tar", "w") as archive:
        info = tarfile.TarInfo("x.png")
        data = (squares / "0.png").read_bytes()
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    with pytest.raises(DataError, match=r"a.tar: sample x has no caption \(.txt, or .json"):
        scan_folder(broken)


def _batches(data: Path, process_index: int = 0, process_count: int = 1, class_data=None, **images) -> Batches:
    config = TrainConfig(
        model="random:tiny",
        mode="dreambooth" if class_data else "full",
        images=Images(resolution=16, random_flip=True, center_crop=False, caption_dropout=0.3, **images),
        optim=Optim(batch_size=4, grad_accum=2),
        seed=3,
    ).replace(class_prompt="a picture")
    setup = model.make_setup(config, testing.random_pipeline(MICRO))
    examples = scan_folder(data)
    class_examples = scan_folder(class_data) if class_data else []
    return Batches(setup, examples, class_examples, 1, process_index=process_index, process_count=process_count)


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_workers_resume_and_two_hosts_read_the_arrays_of_one_thread(squares, tmp_path):
    """grain with 2 worker processes gives the one-thread reader's steps; starting at step 3 gives its
    steps from 3 on (a resumed run); with 2 processes each reads its own half of every micro-batch (row
    ids disjoint, together the 1-process rows); tar shards give the folder's arrays."""
    batches = _batches(squares)
    threaded = list(loader.steps(batches.step, 0, 6))
    assert len(threaded) == 6 and threaded[0]["pixels"].shape == (2, 4, 16, 16, 3)
    for a, b in zip(threaded, loader.steps(batches.step, 0, 6, workers=2), strict=True):
        _same(a, b)
    for a, b in zip(threaded[3:], loader.steps(batches.step, 3, 6, workers=2), strict=True):
        _same(a, b)
    halves = [_batches(squares, process_index=i, process_count=2) for i in (0, 1)]
    for step in range(6):
        whole = threaded[step]
        parts = [h.step(step) for h in halves]
        rows = [set(p["row"].ravel().tolist()) for p in parts]
        assert not rows[0] & rows[1] and rows[0] | rows[1] == set(whole["row"].ravel().tolist())
        _same({k: np.concatenate([p[k] for p in parts], axis=1) for k in whole}, whole)
    shards = _batches(write_shards(tmp_path / "shards", squares))
    for step in (0, 5):
        _same(shards.step(step), threaded[step])
    with pytest.raises(ValueError, match="loader_workers must be >= 0"):
        Images(loader_workers=-1)


def test_bucket_shapes_follow_the_images_aspect_ratios():
    from train.buckets import bucket_sizes, nearest_bucket

    sizes = bucket_sizes(512)
    assert sizes == ((384, 640), (448, 576), (512, 512), (576, 448), (640, 384))
    assert all(w * h <= 512 * 512 and w % 64 == 0 and h % 64 == 0 for w, h in sizes)
    assert [sizes[nearest_bucket(s, sizes)] for s in ((800, 600), (600, 800), (999, 1000), (3000, 1000))] == [
        (576, 448),
        (448, 576),
        (512, 512),
        (640, 384),
    ]
    assert (1344, 768) in bucket_sizes(1024) and (768, 1344) in bucket_sizes(1024)  # SDXL's usual ones
    with pytest.raises(ValueError, match="resolution 500 must be a multiple of 64"):
        bucket_sizes(500)


def _mixed(folder: Path) -> Path:
    """Ten images: four wide (96x48), four tall (48x96), two square (64x64), captioned by shape."""
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    rng = np.random.default_rng(0)
    for i, (w, h, name) in enumerate([(96, 48, "wide")] * 4 + [(48, 96, "tall")] * 4 + [(64, 64, "square")] * 2):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        records.append({"file_name": f"{i}.png", "text": f"a {name} picture {i}"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def test_buckets_give_each_step_one_shape_and_every_image_each_epoch(tmp_path):
    """resolution 16 on the MICRO model (its size step is 2): the wide (2:1) images train at 20x12 (the
    nearest ratio within [1/2, 2] of at most 16^2 pixels), the tall ones at 12x20, the squares at 16x16; a
    step's 8 images (2 micro-batches of 4) share a bucket; an epoch shows every image; grain workers and
    two processes give the one-thread arrays; the SDXL time ids record the bucket as the target size."""
    from train.data import image_time_ids

    data = _mixed(tmp_path / "mixed")
    examples = scan_folder(data)
    batches = _batches(data, buckets=True)
    order = batches.buckets
    assert order.used() == {(12, 20): 4, (16, 16): 2, (20, 12): 4}
    assert order.steps_per_epoch == 3  # one step per bucket, each filled up to 8 images from its start
    threaded = list(loader.steps(batches.step, 0, 2 * order.steps_per_epoch))
    for epoch in range(2):
        seen = []
        for step in range(epoch * 3, epoch * 3 + 3):
            (w, h), group = order.step(step)
            assert threaded[step]["pixels"].shape == (2, 4, h, w, 3)
            kind = "wide" if w > h else "tall" if h > w else "square"
            assert {examples[i].caption.split()[1] for i in group} == {kind}
            seen += group.tolist()
        assert set(seen) == set(range(10))
    for a, b in zip(threaded, loader.steps(batches.step, 0, len(threaded), workers=2), strict=True):
        _same(a, b)
    halves = [_batches(data, process_index=i, process_count=2, buckets=True) for i in (0, 1)]
    for step in range(len(threaded)):
        parts = [h.step(step) for h in halves]
        _same({k: np.concatenate([p[k] for p in parts], axis=1) for k in threaded[step]}, threaded[step])
    dreambooth = _batches(data, class_data=data, buckets=True)  # class rows cut to the step's bucket too
    for step in range(3):
        (w, h), _ = order.step(step)
        arrays = dreambooth.step(step)
        assert arrays["pixels"].shape == (2, 8, h, w, 3) and arrays["count"][0].tolist() == [1] * 4 + [0] * 4
    # 96x48 covers 20x12 at 24x12: the centered crop starts 2 px in
    assert image_time_ids(examples[0].path, (20, 12), None, False).tolist() == [48, 96, 0, 2, 12, 20]
    assert image_time_ids(examples[0].path, (20, 12), None, True).tolist() == [48, 96, 0, 18, 12, 20]
    with pytest.raises(ValueError, match="cache_latents caches square crops"):
        Images(buckets=True, cache_latents=True)


@pytest.mark.slow  # one compile per bucket shape (3)
def test_a_bucketed_run_trains_every_shape_and_resumes(tmp_path):
    """python -m train --buckets true on the mixed images, batch 2: 6 steps (an epoch is 5: two wide, one
    square, two tall) train, log and export, a step at each shape; a run stopped at step 3 and resumed
    to 6 ends with the uninterrupted run's weights."""
    from test_train import run_args, weights

    from train.__main__ import main

    base = testing.random_pipeline(MICRO).save_pretrained(tmp_path / "base")
    data = _mixed(tmp_path / "mixed")
    whole = tmp_path / "whole"
    extra = ("--buckets", "true", "--batch-size", "2", "--grad-accum", "1", "--checkpoint-every", "3")
    assert main(run_args("sd15_full", base, data, whole, "--steps", "6", *extra)) == 0
    rows = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6] and all(np.isfinite(r["loss"]) for r in rows)
    parted = tmp_path / "parted"
    assert main(run_args("sd15_full", base, data, parted, "--steps", "3", *extra)) == 0
    assert main(run_args("sd15_full", base, data, parted, "--steps", "6", *extra)) == 0
    a = weights(whole / "final/unet/diffusion_pytorch_model.safetensors")
    b = weights(parted / "final/unet/diffusion_pytorch_model.safetensors")
    assert all(np.array_equal(a[k], b[k]) for k in a)
