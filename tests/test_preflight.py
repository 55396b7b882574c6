"""Start-up checks and `vcr1/train.py --dry_run`: every problem a run would hit with its data, model or machine is
one line and exit 2 before any model is built; a runnable config prints its resolved config and plan, exit 0."""
import json

import pytest
import yaml

from vcr1 import train
from vcr1.config import parse_config, to_dict


def _main(capsys, *argv) -> tuple[int, str, str]:
    """vcr1/train.py's main in process: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as e:
        train.main(list(map(str, argv)))
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_dry_run_prints_the_config_and_the_plan(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    code, out, err = _main(capsys, "--dry_run", "--output_dir", tmp_path / "o")
    assert code == 0 and err == ""
    printed = yaml.safe_load(out)
    plan = printed.pop("plan")
    assert printed == to_dict(parse_config(["--output_dir", str(tmp_path / "o")]))
    assert (plan["world_size"], plan["warmup_steps"], plan["grpo_steps"]) == (1, 0, 120)
    assert plan["train_examples_per_task"] == {"tg": 96, "tracking": 96, "gqa": 96}
    assert plan["eval_examples"] == 576 and plan["eval_examples_per_task"] == {"tg": 192, "tracking": 192, "gqa": 192}
    assert plan["rollouts_per_grpo_step"] == 48 and plan["grpo_steps_per_epoch"] == 48
    assert not (tmp_path / "o").exists()  # nothing generated, nothing built

    # under torchrun: the world size from WORLD_SIZE; only rank 0 prints, every rank exits alike
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, out, _ = _main(capsys, "--dry_run", "--output_dir", tmp_path / "o", "--max_steps", "5000")
    plan = yaml.safe_load(out)["plan"]
    assert code == 0 and plan["world_size"] == 2 and plan["grpo_steps"] == 100 * 144 // 6
    monkeypatch.setenv("RANK", "1")
    assert _main(capsys, "--dry_run", "--output_dir", tmp_path / "o") == (0, "", "")
    assert _main(capsys, "--dry_run", "--data", f"tg:{tmp_path / 'no.json'}:{tmp_path}") == (2, "", "")


def _charades(path, videos):
    path.write_text(json.dumps({v: {"duration": 8.0, "timestamps": [[1.0, 2.0]], "sentences": [f"{v} happens."]}
                                for v in videos}))
    return path


def test_wrong_media_root_of_a_real_file_stops_the_run_at_once(shared_data, tmp_path, capsys):
    """The real Charades-STA train file under a media root that does not hold its videos: one line naming the
    media root and missing files, exit 2, before any model is built (no output folder) - with and without
    --dry_run."""
    ann = shared_data / "annotations" / "charades_sta_train.json"
    for extra in ([], ["--dry_run"]):
        code, out, err = _main(capsys, "--data", f"tg:{ann}:/wrong/media_root", "--output_dir", tmp_path / "o", *extra)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
        assert lines[0].startswith("vcr1: data.datasets[0] (tg, ") and "media root /wrong/media_root" in lines[0]
        assert "5336 videos" in lines[0] and lines[0].count("/wrong/media_root/") == 3
        assert not (tmp_path / "o").exists()
    media = tmp_path / "media"
    media.mkdir()
    code, _, err = _main(capsys, "--data", f"tg:{ann}:{media}", "--dry_run")
    assert code == 2 and f"none of its 5336 videos exist under media root {media}, e.g. {media}/" in err


def test_broken_and_unknown_annotation_files_are_one_line_each(tmp_path, capsys):
    broken = tmp_path / "broken.json"
    broken.write_text('{"v1": {"duration": 8.0,, "sentences": []}}')
    unknown = tmp_path / "unknown.json"
    unknown.write_text('{"v1": {"length": 8.0}}')
    empty = _charades(tmp_path / "tg.json", ["a"])
    held_out = f"[{{task: tg, annotations: {tmp_path / 'missing.json'}, media_root: {tmp_path}}}]"
    code, out, err = _main(capsys, "--dry_run", "--data", f"tg:{broken}:{tmp_path}", f"gqa:{unknown}:{tmp_path}",
                           f"tracking:{empty}:{tmp_path}", "--data.eval_datasets", held_out)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 4 and "Traceback" not in err, err
    assert lines[0].startswith(f"vcr1: data.datasets[0] (tg, {broken}): {broken} is neither JSON nor JSONL: "
                               "Expecting property name")
    assert lines[1] == (f"vcr1: data.datasets[1] (gqa, {unknown}): cannot detect the annotation format: pass fmt= "
                        "one of charades, got10k, nextgqa, jsonl")
    assert "data.datasets[2] (tracking" in lines[2] and "format 'charades' holds tg samples, not 'tracking'" in lines[2]
    assert lines[3] == (f"vcr1: data.eval_datasets[0] (tg, {tmp_path / 'missing.json'}): annotation file "
                        f"{tmp_path / 'missing.json'} does not exist")
    assert "plan:" in out  # the dry run still shows what it resolved


def test_some_missing_videos_are_a_warning(tmp_path, capsys):
    """Some videos missing: the run goes on (they are skipped and counted then); a GOT-10k sequence is a frame
    folder; an annotation file with no usable entry is a problem."""
    media = tmp_path / "media"
    media.mkdir()
    (media / "a.mp4").write_bytes(b"")
    tg = _charades(tmp_path / "tg.json", ["a", "b", "c"])
    box = [0.1, 0.1, 0.5, 0.5]
    got = tmp_path / "got.json"
    got.write_text(json.dumps([{"path": f"/cluster/GOT-10k/train/{name}", "object": "cat", "gt": [box] * 8}
                               for name in ("seq1", "seq2")]))
    (media / "seq1").mkdir()
    code, out, err = _main(capsys, "--dry_run", "--data", f"tg:{tg}:{media}", f"tracking:{got}:{media}",
                           "--output_dir", tmp_path / "o")
    lines = err.strip().splitlines()
    assert code == 0 and len(lines) == 2, err
    assert lines[0] == (f"vcr1: warning: data.datasets[0] (tg, {tg}): 2 of its 3 videos are missing under media "
                        f"root {media}, e.g. {media}/b.mp4, {media}/c.mp4: their 2 examples will be skipped and "
                        "counted in skipped/media")
    assert f"1 of its 2 videos are missing under media root {media}, e.g. {media}/seq2:" in lines[1]
    plan = yaml.safe_load(out)["plan"]
    assert plan["train_examples_per_task"] == {"tg": 3, "tracking": 2} and plan["eval_examples"] == 0

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"a": {"duration": 8.0, "timestamps": [[3.0, 1.0]], "sentences": ["x."]}}))
    code, _, err = _main(capsys, "--dry_run", "--data", f"tg:{bad}:{media}")
    assert code == 2 and f"no usable example in {bad} (1 malformed entries skipped)" in err
