"""Factory for the toy LLaVA checkpoint: word-level tokenizer, LlavaProcessor and model config.

The layout is LLaVA-1.5's, shrunk: a CLIP vision tower at 336 px / 14 px patches (CLS + 24 x 24 =
577 tokens, features from hidden_states[-2] without CLS), a 2-layer GELU projector and a Llama
decoder with 8 layers, so that MustDrop's four pruning layers fit. Everything is built offline from
stock transformers classes, so the saved checkpoint loads with the same `from_pretrained` code as
the llava-hf checkpoints. The tokenizer is word-level over the scene world's closed vocabulary.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                          LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast)

from analysis.toyworld import IMAGE_SIZE, PATCH_SIZE, question_words

SPECIAL_TOKENS = ["<unk>", "<pad>", "<s>", "</s>", "<image>"]
ROLE_WORDS = ["user", "assistant", ":"]
N_IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 576

# OpenAI CLIP normalisation, the same constants llava-hf checkpoints use.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# LLaVA-1.5 conversation layout: "<s>USER: <image>\n{question} ASSISTANT: {answer}</s>".
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% elif message['role'] == 'assistant' %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }} "
    "{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }} {% endif %}{% endfor %}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

MUSTDROP_DEFAULTS = {
    "schema": "mustdrop-defaults/1",
    "window": 3,
    "merge_threshold": 0.8,
    "key_keep_rate": 0.08,
    # Reference [2, 6, 10, 14] of 32 layers, scaled to 8; these are the layers whose text->vision
    # attention the training supervises.
    "prune_layers": [1, 2, 3, 4],
    "presets": {
        "192": {"global_thr": 0.001, "individual_thr": 0.001},
        "128": {"global_thr": 0.0012, "individual_thr": 0.001},
        "64": {"global_thr": 0.011, "individual_thr": 0.01},
    },
}


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer: lower-cased, split on whitespace and punctuation, closed vocabulary."""
    vocab = {w: i for i, w in enumerate(SPECIAL_TOKENS + ROLE_WORDS + question_words())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        extra_special_tokens={"image_token": "<image>"}, model_max_length=1024, padding_side="left")


def build_processor() -> LlavaProcessor:
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_resize=True, do_center_crop=True, do_rescale=True, do_normalize=True,
        image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), do_convert_rgb=True)
    return LlavaProcessor(image_processor=image_processor, tokenizer=build_tokenizer(),
                          patch_size=PATCH_SIZE, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)


def build_config(tokenizer: PreTrainedTokenizerFast, vision_width: int = 128, vision_layers: int = 4,
                 text_width: int = 128, text_layers: int = 8, heads: int = 4,
                 text_heads: int | None = None) -> LlavaConfig:
    text_heads = text_heads or heads
    vision = CLIPVisionConfig(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, hidden_size=vision_width,
                              intermediate_size=3 * vision_width, num_hidden_layers=vision_layers,
                              num_attention_heads=heads, projection_dim=vision_width)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=text_width,
                       intermediate_size=3 * text_width, num_hidden_layers=text_layers,
                       num_attention_heads=text_heads, num_key_value_heads=text_heads,
                       max_position_embeddings=1024, rms_norm_eps=1e-5, tie_word_embeddings=True,
                       # With head_dim 32 and theta 1e4 only ~3 of 16 RoPE frequency pairs stay
                       # steady across the ~600-token span between question and image; 1e6 keeps
                       # ~7, so content look-ups into the image do not depend on where a patch sits.
                       rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    return LlavaConfig(vision_config=vision, text_config=text,
                       image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                       vision_feature_layer=-2, vision_feature_select_strategy="default",
                       projector_hidden_act="gelu", tie_word_embeddings=True)


def build_model(seed: int = 0, **sizes) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A freshly initialised toy model and its processor (deterministic in `seed`).

    `sizes` are passed to build_config (vision_width, vision_layers, text_width, text_layers, heads,
    text_heads).
    """
    torch.manual_seed(seed)
    processor = build_processor()
    config = build_config(processor.tokenizer, **sizes)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.bos_token_id = processor.tokenizer.bos_token_id
    return model, processor


def pixel_values(images: np.ndarray) -> torch.Tensor:
    """(B, 336, 336, 3) uint8 -> normalised (B, 3, 336, 336) float32, as the processor computes it.

    Training uses this instead of the processor to avoid a PIL round trip per image; a test checks
    that the two agree.
    """
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def save(model: LlavaForConditionalGeneration, processor: LlavaProcessor, out: str | Path,
         mustdrop: dict | None = None) -> None:
    """Write the stock checkpoint, the processor and mustdrop.json into `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    (out / "mustdrop.json").write_text(json.dumps(mustdrop or MUSTDROP_DEFAULTS, indent=2) + "\n")


def prompt(processor: LlavaProcessor, question: str) -> str:
    """The single-turn generation prompt for one image and one question."""
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(conv, add_generation_prompt=True)
