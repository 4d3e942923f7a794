"""Seeded random LLaVA-1.5-layout models built offline, for tests and benchmarks.

They take the path a real checkpoint takes: ``save_pretrained`` into a folder, then the same
``from_pretrained`` code as llava-hf checkpoints. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}"
    "{{ item['text'] }}{% endif %}{% endfor %}{% if message['role'] == 'user' %} {% else %}</s>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
WORDS = ("a chat between a curious human and an artificial intelligence assistant the gives helpful "
         "answers to questions what colour color is shape of there how many objects left right above "
         "below red green blue yellow purple orange circle square triangle star cross yes no one two three "
         "four five image picture describe this in USER ASSISTANT : ? . ,").split()


def build_tokenizer(folder: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<pad>", "<s>", "</s>", "<image>"],
                                  show_progress=False)
    corpus = [" ".join(WORDS)] * 4 + [w for w in WORDS]
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", extra_special_tokens={"image_token": "<image>"})
    fast.add_bos_token = True
    return fast


def _sharpen_and_save(model, processor, folder: Path) -> Path:
    """Scale the random weights up so attention is not uniform and merging is non-trivial, then save
    model and processor as a checkpoint folder."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.mul_(3.0)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def build_tiny_llava(folder, *, vision_hidden=32, vision_layers=3, vision_heads=4, text_hidden=64,
                     text_layers=6, text_heads=4, text_kv_heads=2, intermediate=128, seed=0,
                     attn_implementation="sdpa"):
    """Save a seeded random LLaVA-1.5-layout model (CLIP 336/14: 24 x 24 grid + CLS) and its processor."""
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                         do_center_crop=True, do_resize=True, do_normalize=True,
                                         image_mean=[0.48145466, 0.4578275, 0.40821073],
                                         image_std=[0.26862954, 0.26130258, 0.27577711])
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=CHAT_TEMPLATE)
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=vision_hidden,
                                       intermediate_size=vision_hidden * 4, num_hidden_layers=vision_layers,
                                       num_attention_heads=vision_heads, projection_dim=vision_hidden),
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=text_hidden, intermediate_size=intermediate,
                                num_hidden_layers=text_layers, num_attention_heads=text_heads,
                                num_key_value_heads=text_kv_heads, max_position_embeddings=2048,
                                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.pad_token_id),
        image_token_id=image_token_id, vision_feature_layer=-2, vision_feature_select_strategy="default",
        projector_hidden_act="gelu", image_seq_length=576,
    )
    config.text_config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    return _sharpen_and_save(LlavaForConditionalGeneration(config), processor, folder)


def build_tiny_siglip_llava(folder, *, text_model="qwen2", vision_hidden=32, vision_layers=3, vision_heads=4,
                            text_hidden=64, text_layers=6, text_heads=4, text_kv_heads=2, intermediate=128, seed=0):
    """A LLaVA with a SigLIP tower (no CLS; 378 / 14 -> 27 x 27 = 729 tokens) and a Qwen2 or Llama decoder,
    the llava-interleave / onevision-0.5B style layout, saved like a real checkpoint."""
    from transformers import (LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor, Qwen2Config,
                              SiglipImageProcessor, SiglipVisionConfig)

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(folder)
    image_processor = SiglipImageProcessor(size={"height": 378, "width": 378}, do_resize=True, do_normalize=True,
                                           image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                               vision_feature_select_strategy="full", num_additional_image_tokens=0,
                               chat_template=CHAT_TEMPLATE)
    text_cls = Qwen2Config if text_model == "qwen2" else LlamaConfig
    config = LlavaConfig(
        vision_config=SiglipVisionConfig(image_size=378, patch_size=14, hidden_size=vision_hidden,
                                         intermediate_size=vision_hidden * 4, num_hidden_layers=vision_layers,
                                         num_attention_heads=vision_heads, vision_use_head=False),
        text_config=text_cls(vocab_size=len(tokenizer), hidden_size=text_hidden, intermediate_size=intermediate,
                             num_hidden_layers=text_layers, num_attention_heads=text_heads,
                             num_key_value_heads=text_kv_heads, max_position_embeddings=2048,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
        vision_feature_select_strategy="full", projector_hidden_act="gelu", image_seq_length=729,
    )
    torch.manual_seed(seed)
    return _sharpen_and_save(LlavaForConditionalGeneration(config), processor, folder)


def build_tiny_llava_next(folder, *, vision_hidden=32, vision_layers=3, vision_heads=4, text_hidden=64,
                          text_layers=6, text_heads=4, text_kv_heads=2, intermediate=128, seed=0,
                          pinpoints=((336, 672), (672, 336), (672, 672))):
    """A LLaVA-NeXT (any-res: base 336 x 336 + tiles of 336, each a 24 x 24 grid with CLS, newline
    rows, unpadding) with a Llama decoder, saved like a real checkpoint."""
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration,
                              LlavaNextImageProcessor, LlavaNextProcessor)

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(folder)
    pins = [list(p) for p in pinpoints]
    image_processor = LlavaNextImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                              image_grid_pinpoints=pins, do_center_crop=True,
                                              image_mean=[0.48145466, 0.4578275, 0.40821073],
                                              image_std=[0.26862954, 0.26130258, 0.27577711])
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=CHAT_TEMPLATE)
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=vision_hidden,
                                       intermediate_size=vision_hidden * 4, num_hidden_layers=vision_layers,
                                       num_attention_heads=vision_heads, projection_dim=vision_hidden),
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=text_hidden, intermediate_size=intermediate,
                                num_hidden_layers=text_layers, num_attention_heads=text_heads,
                                num_key_value_heads=text_kv_heads, max_position_embeddings=8192,
                                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.pad_token_id),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu", image_grid_pinpoints=pins,
    )
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config)
    with torch.no_grad():
        model.model.image_newline.normal_()
    return _sharpen_and_save(model, processor, folder)
