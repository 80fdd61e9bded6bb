"""The training input pipeline: WebDataset tar shards, grain worker processes, resuming and multi-host
splits all give the arrays of the one-thread reader of an image folder (train.data, train.loader)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
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


def _batches(data: Path, process_index: int = 0, process_count: int = 1, **images) -> Batches:
    config = TrainConfig(
        model="random:tiny",
        images=Images(resolution=16, random_flip=True, center_crop=False, caption_dropout=0.3, **images),
        optim=Optim(batch_size=4, grad_accum=2),
        seed=3,
    )
    setup = model.make_setup(config, testing.random_pipeline(MICRO))
    examples = scan_folder(data)
    return Batches(setup, examples, [], 1, process_index=process_index, process_count=process_count)


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
