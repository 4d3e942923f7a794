"""The question a user typed: checked once, for the library, the CLI and the app alike.

It must be text (a str: an API payload may send a list or a dict), not empty, encodable as UTF-8 (a
command line with invalid UTF-8 bytes reaches Python as lone surrogates, which no tokenizer can
encode) and at most MAX_QUESTION_CHARS long. What the model's prompt adds (the image placeholder,
special tokens) is the adapter's business.
"""

from __future__ import annotations

MAX_QUESTION_CHARS = 2000


def check_question(question) -> str:
    """The question, stripped; ValueError naming what is wrong with it."""
    if question is None:
        raise ValueError("the question is empty: type a question about the image")
    if not isinstance(question, str):
        raise ValueError(f"the question must be text (a string), got a {type(question).__name__}")
    q = question.strip()
    if not q:
        raise ValueError("the question is empty: type a question about the image")
    try:
        q.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"the question is not valid UTF-8 text: character {e.start + 1} is "
                         f"{ascii(q[e.start])}, a lone surrogate (invalid bytes); retype it") from None
    if len(q) > MAX_QUESTION_CHARS:
        raise ValueError(f"the question is {len(q)} characters long; the limit is {MAX_QUESTION_CHARS}")
    return q
