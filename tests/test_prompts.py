"""Each task's prompt against the verbatim text of the paper's prompts (the project spec's §3, read from the
spec file itself; docs/paper.md §3 quotes them)."""
import re

import pytest

from vcr1.prompts import build_messages
from vcr1.tasks import get_task

OPTIONS = ["(A) laughing", "(B) tie shoelace", "(C) adjust shoes", "(D) focused on the ground",
           "(E) attract dog's attention"]


def build_prompt(task, fields, think=True):
    return get_task(task).prompt(fields, think)


QA = {"question": "why did the boy bend down", "options": OPTIONS}
TRACK = {"object": "sloth", "start": [0.093, 0.0, 0.8, 0.797]}


@pytest.fixture(scope="module")
def spec(shared_data):
    text = (shared_data.parent / "spec" / "videochat_r1.md").read_text(encoding="utf-8")
    section = text[text.index("## 3. Prompts"):text.index("## 4. Rewards")]
    tg, gqa, track = re.findall(r"```\n(.*?)\n```", section, re.DOTALL)
    assert "[EVENT]" in tg and "[OPTION]" in gqa and "[START]" in track
    # the no-think GQA prompt is quoted in prose (wrapped over lines), up to its "…"
    quote = re.search(r"`(Answer the\s+question.*?)…`", section, re.DOTALL).group(1)
    return {"tg": tg, "gqa": gqa, "tracking": track, "gqa_no_think_prefix": " ".join(quote.split())}


def paragraphs(block):
    parts = block.split("\n\n")
    assert len(parts) == 3 and parts[1].startswith("Output your thought process")
    return parts


def fill_qa(text):
    return text.replace("[QUESTION]", QA["question"]).replace("[OPTION]", str(OPTIONS))


@pytest.mark.parametrize("event, cleaned", [
    ("Person turn a light on.", "person turn a light on"),
    ("  A person OPENS the door. \n", "a person opens the door"),
    ("person holds a cup..", "person holds a cup."),      # only one trailing "." goes
    ("person sits", "person sits"),
])
def test_tg(spec, event, cleaned):
    intro, _, answer = paragraphs(spec["tg"])
    assert build_prompt("tg", {"event": event}) == spec["tg"].replace("[EVENT]", cleaned)
    no_think = build_prompt("tg", {"event": event}, think=False)
    assert answer.startswith("Then, provide the start and end times")
    assert no_think == intro.replace("[EVENT]", cleaned) + "\n\n" + "Provide" + answer[len("Then, provide"):]


def test_gqa(spec):
    intro, _, answer = paragraphs(spec["gqa"])
    assert build_prompt("gqa", QA) == fill_qa(spec["gqa"])
    assert "['(A) laughing', " in build_prompt("gqa", QA)      # str() of the list, as released
    no_think = build_prompt("gqa", QA, think=False)
    assert no_think == fill_qa(intro + " Provide" + answer[len("Then, provide"):])
    assert "\n" not in no_think
    assert no_think.startswith(fill_qa(spec["gqa_no_think_prefix"]))


def test_tracking(spec):
    intro, _, answer = paragraphs(spec["tracking"])
    filled = spec["tracking"].replace("[OBJECT]", "sloth").replace("[START]", "[0.093, 0.0, 0.8, 0.797]")
    assert build_prompt("tracking", TRACK) == filled
    no_think = build_prompt("tracking", TRACK, think=False)
    assert no_think == filled.replace("\n\n" + paragraphs(filled)[1], "")
    assert no_think.endswith(answer)


def test_mcq_is_gqa_without_glue(spec):
    cut = "letter of the option."
    gqa_think, gqa_no_think = build_prompt("gqa", QA), build_prompt("gqa", QA, think=False)
    assert build_prompt("mcq", QA) == gqa_think[:gqa_think.index(cut) + len(cut)]
    assert build_prompt("mcq", QA, think=False) == gqa_no_think[:gqa_no_think.index(cut) + len(cut)]
    assert "glue" not in build_prompt("mcq", QA) + build_prompt("mcq", QA, think=False)


def test_messages_text_then_video():
    messages = build_messages("Track it.")
    assert messages == [{"role": "user", "content": [{"type": "text", "text": "Track it."}, {"type": "video"}]}]


def test_bad_input():
    with pytest.raises(ValueError):
        build_prompt("caption", {"event": "x"})
    with pytest.raises(ValueError):
        build_prompt("gqa", {"question": "why"})
