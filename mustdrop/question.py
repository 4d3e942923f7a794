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


def special_strings(tokenizer) -> list[str]:
    """The text of the tokenizer's special added tokens (</s>, <pad>, <|im_start|> ...)."""
    return [t.content for t in tokenizer.added_tokens_decoder.values() if getattr(t, "special", False)]


def as_text(input_ids, prompt: str, question: str, tokenizer, image_token_id: int, force: bool = False):
    """The processor's ``input_ids`` (1, L) with the question tokenised as text: special-token strings
    typed into it (``</s>``, ``<pad>``) become the pieces of their characters, not the special ids.

    A question without such a string returns ``input_ids`` itself (bit-identical to before). Otherwise
    the stretch of the prompt between the template's own added tokens around the question is
    tokenised again with ``split_special_tokens`` (the tokenizer treats each such stretch on its own, so
    the ids around it do not change) and spliced in place of the tokens that covered it; the image
    placeholder keeps the processor's count. ``force`` takes the splicing path for any question (tests:
    for a plain question it must give the processor's ids)."""
    import torch

    if not force and not any(s in question for s in special_strings(tokenizer)):
        return input_ids
    qs = prompt.rfind(question)
    if qs < 0:
        raise ValueError("the chat template changed the question's text; cannot keep it as text")
    qe = qs + len(question)
    enc = tokenizer(prompt, return_offsets_mapping=True)
    ids, offs = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    added = {i: t.content for i, t in tokenizer.added_tokens_decoder.items()}
    # matched as added tokens: their text is there (an <unk> the model made of "\n" is not one)
    marks = [(s, e) for i, (s, e) in zip(ids, offs) if i in added and s < e and prompt[s:e].strip() == added[i]]
    lo = max((e for s, e in marks if e <= qs), default=0)
    hi = min((s for s, e in marks if s >= qe), default=len(prompt))
    covered = [k for k, (s, e) in enumerate(offs) if s < e and lo <= s and e <= hi]
    first, last = covered[0], covered[-1]
    if any(not (s < e and lo <= s and e <= hi) for s, e in offs[first:last + 1]):
        raise ValueError("cannot keep the question as text: the template's tokens interleave with it")
    piece = tokenizer(prompt[lo:hi], add_special_tokens=False, split_special_tokens=True)["input_ids"]
    out = ids[:first] + list(piece) + ids[last + 1:]
    n_image = int((input_ids[0] == image_token_id).sum())
    if out.count(image_token_id) != 1:
        raise ValueError("cannot keep the question as text: expected one image placeholder in the template")
    at = out.index(image_token_id)
    out = out[:at] + [image_token_id] * n_image + out[at + 1:]
    return torch.tensor([out], dtype=input_ids.dtype)
