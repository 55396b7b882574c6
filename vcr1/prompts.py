"""What every task's prompt shares (docs/paper.md §3): the think paragraph, the answers' precision, and the
chat turn that carries a prompt and its video. Each task's own text is in its module under vcr1/tasks.

A prompt is one user turn: the text, then the video. The default Qwen system prompt comes from the
chat template, not from here.
"""

THINK = ("Output your thought process within the <think> </think> tags, including analysis with "
         "either specific timestamps (xx.xx) or time ranges (xx.xx to xx.xx) in <timestep> </timestep> tags.")
DECIMALS = 2  # the precision the prompts ask for ("two decimal places"; the tracking example's boxes)


def then(paragraph: str) -> str:
    """After the think paragraph an answer instruction reads "Then, provide ..." instead of "Provide ..."."""
    return "Then, " + paragraph[0].lower() + paragraph[1:]


def build_messages(text: str) -> list:
    """One user turn in the Hugging Face chat format: the prompt text, then the video."""
    return [{"role": "user", "content": [{"type": "text", "text": text}, {"type": "video"}]}]
