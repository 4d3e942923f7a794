"""The question and the prompt around the image: checks on the user's question, the one block of
image placeholders in the processor's ids, and the embeddings that enter the language model."""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from ..question import MAX_QUESTION_CHARS, check_question  # noqa: F401 - MAX_QUESTION_CHARS: importers


def clean_question(question, processor) -> str:
    q = check_question(question)
    image_token = getattr(processor, "image_token", None) or "<image>"
    if image_token in q:
        raise ValueError(f"the question contains the image placeholder {image_token!r}; remove it")
    return q


def split_prompt(input_ids, image_token_id: int):
    """Find the prompt's one block of image ids, on the host (the processor's ids never went to
    the device); return the ids without it (1, S + T), S (tokens before the image) and T."""
    ids = input_ids.numpy()[0]
    pos = np.flatnonzero(ids == image_token_id)
    if pos.size == 0:
        raise ValueError("the prompt holds no <image> placeholder")
    if pos[-1] - pos[0] + 1 != pos.size:
        raise ValueError(f"expected one contiguous block of <image> tokens, found {pos.size} scattered: "
                         "the question may contain the image token string")
    S = int(pos[0])
    text = np.concatenate([ids[:S], ids[pos[-1] + 1:]])[None]
    return torch.from_numpy(text), S, text.shape[1] - S


def embeds(model, text_ids, S: int, features):
    """What enters the language model: the prompt's token embeddings with the N0 vision tokens
    in place of the image block. Built here, not by transformers' placeholder scatter, which
    reads the placeholder count back from the device and scatters through a mask."""
    e = model.get_input_embeddings()(text_ids.to(model.device))
    return torch.cat([e[:, :S], features.to(e.dtype).unsqueeze(0), e[:, S:]], dim=1)


def input_hash(image_sha256: str, question: str) -> str:
    """Identifies an (image, question) pair: the same request gives the same hash."""
    return hashlib.sha256(f"{image_sha256}\n{question}".encode()).hexdigest()[:16]
