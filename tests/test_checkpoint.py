"""Checkpoints without DeepSpeed (a stand-in engine): durable writes, pruning by run, resume lookup."""
import os
from pathlib import Path

import pytest

from vcr1 import checkpoint
from vcr1.checkpoint import find_checkpoint, protected_name


class FakeModel:
    def state_dict(self):
        return {}

    def save_pretrained(self, path, state_dict, safe_serialization):
        (Path(path) / "model.safetensors").write_bytes(b"weights")
        (Path(path) / "config.json").write_text("{}")


class FakeTokenizer:
    def save_pretrained(self, path):
        (Path(path) / "tokenizer.json").write_text("{}")


class FakeEngine:
    """Writes what DeepSpeed's save_checkpoint writes: <dir>/<tag>/<shards> and <dir>/latest."""
    module = FakeModel()

    def save_checkpoint(self, path, tag):
        (Path(path) / tag).mkdir(parents=True)
        (Path(path) / tag / "mp_rank_00_model_states.pt").write_bytes(b"engine")
        (Path(path) / "latest").write_text(tag)

    def load_checkpoint(self, path, **_):
        pass


def save(out, step, run_id, keep=2, protect=0):
    return checkpoint.save(out, step, engine=FakeEngine(), tokenizer=FakeTokenizer(), zero_stage=0, rank=0,
                           trainer_state={"step": step}, rank_state={}, model_src=None, run_id=run_id,
                           keep=keep, protect=protect)


def test_every_file_is_fsynced_before_the_rename_and_latest_after(tmp_path, monkeypatch):
    events = []
    fsync, rename, replace = os.fsync, os.rename, os.replace

    def record_fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def record(name, real):
        return lambda src, dst: (events.append((name, str(src), str(dst))), real(src, dst))[-1]

    monkeypatch.setattr(os, "fsync", record_fsync)
    monkeypatch.setattr(os, "rename", record("rename", rename))
    monkeypatch.setattr(os, "replace", record("replace", replace))
    out = tmp_path.resolve()
    final = save(out, 7, "run")
    root, tmp = final.parent, final.with_name(final.name + ".tmp")

    at_rename = events.index(("rename", str(tmp), str(final)))
    synced = {e[1] for e in events[:at_rename] if e[0] == "fsync"}
    tree = [final, *final.rglob("*")]
    assert len(tree) > 8  # weights, tokenizer, trainer state, engine folder and shard, rank0.pt
    assert {str(tmp / p.relative_to(final)) for p in tree} <= synced

    # the rename is on disk, then `latest` is written to a temporary file, flushed, swapped in, and made durable
    after = events[at_rename + 1:]
    pointer, pointer_tmp = root / "latest", root / "latest.tmp"
    assert after == [("fsync", str(root)), ("fsync", str(pointer_tmp)),
                     ("replace", str(pointer_tmp), str(pointer)), ("fsync", str(root))]
    assert pointer.read_text() == final.name


def test_pruning_keeps_other_runs_and_the_warm_up(tmp_path):
    save(tmp_path, 500, "old")
    save(tmp_path, 600, "old")
    legacy = tmp_path / "checkpoints" / protected_name(1)  # written before checkpoints had a run id
    legacy.mkdir()
    (legacy / "trainer_state.json").write_text('{"step": 1}')
    for step in (2, 3, 4, 5):
        save(tmp_path, step, "new", protect=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step-000001", "step-000002", "step-000004", "step-000005", "step-000500",
                     "step-000600"]
    assert find_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step-000005"


def test_pruning_orders_by_step_number(tmp_path):
    save(tmp_path, 999_999, "run", keep=1)
    save(tmp_path, 1_000_000, "run", keep=1)  # sorts before step-999999 by name
    assert [p.name for p in (tmp_path / "checkpoints").glob("step-*")] == ["step-1000000"]


def test_the_run_id_comes_back_on_load(tmp_path):
    path = save(tmp_path, 3, "abc")
    state, rank_state = checkpoint.load(path, engine=FakeEngine(), rank=0)
    assert state == {"step": 3, "run_id": "abc"} and rank_state == {}
    assert checkpoint.run_id_of(path) == "abc"


@pytest.mark.parametrize("setup, problem", [
    (lambda root: None, "does not exist"),
    (lambda root: (root / "latest").write_text("step-000009"), "step-000009, which is missing"),
    (lambda root: (root / "latest").write_text("step-000002"), "step-000002, which is incomplete"),
    (lambda root: (root / "latest").write_text("step-000003.tmp"), "step-000003.tmp, which is incomplete"),
])
def test_no_usable_checkpoint(tmp_path, setup, problem):
    root = tmp_path / "checkpoints"
    (root / "step-000002").mkdir(parents=True)
    (root / "step-000002" / "trainer_state.json").write_text("{}")  # no engine state
    save(tmp_path, 3, "run")
    (root / "step-000003").rename(root / "step-000003.tmp")  # whole, but never renamed into place
    (root / "latest").unlink()
    setup(root)
    assert find_checkpoint(tmp_path) is None
    with pytest.raises(FileNotFoundError, match=problem) as err:
        find_checkpoint(tmp_path, required=True)
    assert "--resume auto" in str(err.value)


def test_the_latest_checkpoint_is_found(tmp_path):
    save(tmp_path, 3, "run")
    path = save(tmp_path, 4, "run")
    assert find_checkpoint(tmp_path) == find_checkpoint(tmp_path, required=True) == path
    assert checkpoint.is_complete(path)
