"""User-turn prompts of VideoChat-R1, verbatim (spec §3), with think and no-think variants.

A prompt is one user turn: the text, then the video. The default Qwen system prompt comes from the
chat template, not from here.
"""

_THINK = ("Output your thought process within the <think> </think> tags, including analysis with "
          "either specific timestamps (xx.xx) or time ranges (xx.xx to xx.xx) in <timestep> </timestep> tags.")

_TG_TASK = ('To accurately pinpoint the event "{event}" in the video, determine the precise time period '
            "of the event.")
_TG_ANSWER = ('Provide the start and end times (in seconds, precise to two decimal places) in the format '
              '"start time to end time" within the <answer> </answer> tags. For example: "12.54 to 17.83".')

_QA_TASK = ('Answer the question: "{question}" according to the content of the video. Select the answer '
            "from :{options}.")
_QA_ANSWER = ("Provide your answer within the <answer> </answer> tags, output the corresponding letter of "
              "the option.")
_GLUE = (" At the same time, in the <glue> </glue> tags, present the precise time period in seconds of the "
         "video clips on which you base your answer to this question in the format of "
         "[(s1, e1), (s2, e2), ...]. For example: <answer>A</answer><glue>[(5.2, 10.4)]</glue>.")

_TRACK_TASK = ('Track the "{object}" in the video based on its initial coordinates "{start}". The output '
               "should be a list containing eight sublists. Each sublist includes four normalized "
               "coordinates [x0, y0, x1, y1] representing the bounding box of the object at specific "
               "time intervals.")
_TRACK_ANSWER = ("Provide your answer within the <answer> </answer> tags as a list of eight sublists, "
                 "where each sublist contains the normalized coordinates [x0, y0, x1, y1]. For example: "
                 "<answer>[[0.1, 0.5, 0.3, 0.55], [0.72, 0.25, 0.84, 0.43], ...]</answer>.")

TASKS = ("tg", "tracking", "gqa", "mcq")  # the paper's tasks; every other module imports this
DECIMALS = 2  # the precision the prompts ask for ("two decimal places"; the tracking example's boxes)


def _then(paragraph: str) -> str:
    # After the think paragraph the answer instruction reads "Then, provide ..." instead of "Provide ...".
    return "Then, " + paragraph[0].lower() + paragraph[1:]


def _field(fields: dict, key: str):
    if key not in fields:
        raise ValueError(f"prompt fields {sorted(fields)} lack {key!r}")
    return fields[key]


def build_prompt(task: str, fields: dict, think: bool = True) -> str:
    """User-turn text. fields: tg {event}; tracking {object, start}; gqa/mcq {question, options}."""
    if task == "tg":
        event = str(_field(fields, "event")).strip().lower()
        if event.endswith("."):
            event = event[:-1]
        task_text = _TG_TASK.format(event=event)
        return (f"{task_text}\n\n{_THINK}\n\n{_then(_TG_ANSWER)}" if think
                else f"{task_text}\n\n{_TG_ANSWER}")
    if task == "tracking":
        task_text = _TRACK_TASK.format(object=_field(fields, "object"), start=str(_field(fields, "start")))
        return (f"{task_text}\n\n{_THINK}\n\n{_TRACK_ANSWER}" if think
                else f"{task_text}\n\n{_TRACK_ANSWER}")
    if task in ("gqa", "mcq"):
        task_text = _QA_TASK.format(question=_field(fields, "question"),
                                    options=str(_field(fields, "options")))
        answer = _QA_ANSWER + (_GLUE if task == "gqa" else "")
        # The released no-think QA prompts are one paragraph.
        return (f"{task_text}\n\n{_THINK}\n\n{_then(answer)}" if think
                else f"{task_text} {answer}")
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def build_messages(task: str, fields: dict, think: bool = True) -> list:
    """One user turn in the Hugging Face chat format: the prompt text, then the video."""
    return [{"role": "user", "content": [{"type": "text", "text": build_prompt(task, fields, think)},
                                         {"type": "video"}]}]
