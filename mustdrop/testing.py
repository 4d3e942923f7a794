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


# ---------------------------------------------------------------- published llava-hf layouts
# Widths of the tiny copies; everything else comes from the published files.
TINY_VISION = {"hidden_size": 32, "intermediate_size": 128, "num_attention_heads": 4, "num_hidden_layers": 3,
               "projection_dim": 32}
TINY_TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4}
SIZE_FIELDS = {"hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers",
               "projection_dim", "head_dim"}


def _chain_merges(pieces):
    """BPE merges that build each piece left to right from its characters, and every token they need."""
    merges, tokens = [], []
    for piece in pieces:
        chars = list(piece)
        tokens.extend(chars)
        cur = chars[0]
        for c in chars[1:]:
            if (cur, c) not in merges:
                merges.append((cur, c))
            cur = cur + c
            tokens.append(cur)
    return merges, list(dict.fromkeys(tokens))


def _fill_vocab(size, fixed: dict, extra, reserved=()):
    """A vocabulary of exactly ``size`` entries: ``fixed`` pieces at their real ids, ``extra`` tokens at free
    ids, and never-produced fillers everywhere else."""
    vocab = dict(fixed)
    taken = set(vocab.values()) | set(reserved)
    free = (i for i in range(size) if i not in taken)
    for t in extra:
        if t not in vocab:
            vocab[t] = next(free)
    for i in free:
        vocab[f"<filler_{i}>"] = i
    assert len(vocab) == size and len(set(vocab.values())) == size
    return vocab


def build_published_tokenizer(facts: dict):
    """A tokenizer of the published kind in which the role markers, <image>, "\\n" and the listed pieces get
    the published ids, at the published vocabulary size, with the published special tokens.

    llama-sentencepiece: BPE with byte fallback (<0x00>..<0xFF> at 3..258), the Prepend("▁") + Replace(" ", "▁")
    normalizer and "<s> $A" post-processor of llava-hf's Llama / Mistral tokenizer.json.
    qwen2-bytelevel: byte-level BPE (GPT-2 byte alphabet at ids 0..255) with Qwen2's split pattern, no BOS."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    special = {k: tuple(v) for k, v in facts["special"].items()}
    pieces = dict(facts["pieces"])
    if facts["kind"] == "llama-sentencepiece":
        fixed = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}, **pieces}
        merges, needed = _chain_merges([p for p in pieces if len(p) > 1])
        vocab = _fill_vocab(facts["base_vocab"], fixed, needed)
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", 1)])
    elif facts["kind"] == "qwen2-bytelevel":
        alphabet = list(pre_tokenizers.ByteLevel.alphabet())
        fixed = {ch: i for i, ch in enumerate(_gpt2_byte_order())}
        fixed.update(pieces)
        merges, needed = _chain_merges([p for p in pieces if len(p) > 1])
        assert set(alphabet) <= set(fixed)
        vocab = _fill_vocab(facts["base_vocab"], fixed, needed)
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
        tok.normalizer = normalizers.NFC()
        pattern = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                   r"\s*[\r\n]+|\s+(?!\S)|\s+")
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    else:
        raise ValueError(f"unknown tokenizer kind {facts['kind']!r}")
    added = sorted((i, t) for t, i in special.values() if i >= facts["base_vocab"])
    for expect, t in added:
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False)])
        assert tok.token_to_id(t) == expect, f"{t} got id {tok.token_to_id(t)}, published {expect}"
    kw = {f"{k}_token": special[k][0] for k in ("unk", "bos", "eos", "pad") if k in special}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, extra_special_tokens={"image_token": special["image"][0]},
                                   **kw)
    return fast


def _gpt2_byte_order():
    """GPT-2's byte-to-unicode table in id order: the 256 single-byte tokens of byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def build_published_tiny(folder, published, *, text_layers: int | None = None, seed: int = 0):
    """A tiny copy of a published llava-hf checkpoint: its config.json with only the widths (and the vision
    depth; the decoder depth when ``text_layers`` is given) shrunk, its image processor, processor settings,
    chat template and a tokenizer of its kind (``build_published_tokenizer``), saved like the real one.

    ``published`` is a folder with config.json, preprocessor_config.json, processor_config.json,
    chat_template.json and tokenizer_facts.json (tests/published/<name>). Grouped-query attention keeps the
    published ratio of query to KV heads."""
    import json

    import transformers
    from transformers import AutoConfig, AutoImageProcessor, LlavaNextProcessor, LlavaProcessor

    published, folder = Path(published), Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((published / "config.json").read_text())
    text, vision = dict(cfg["text_config"]), dict(cfg["vision_config"])
    defaults = AutoConfig.for_model(text["model_type"]).to_dict()
    cfg["text_config"] = {**text, **_tiny_text_fields(text, defaults, text_layers)}
    tiny_vision = {k: v for k, v in TINY_VISION.items() if k != "projection_dim" or "projection_dim" in vision}
    cfg["vision_config"] = {**vision, **tiny_vision}
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    (folder / "preprocessor_config.json").write_text((published / "preprocessor_config.json").read_text())

    tokenizer = build_published_tokenizer(json.loads((published / "tokenizer_facts.json").read_text()))
    image_processor = AutoImageProcessor.from_pretrained(folder)
    pconf = json.loads((published / "processor_config.json").read_text())
    proc_cls = LlavaNextProcessor if pconf["processor_class"] == "LlavaNextProcessor" else LlavaProcessor
    processor = proc_cls(image_processor=image_processor, tokenizer=tokenizer, patch_size=pconf["patch_size"],
                         vision_feature_select_strategy=pconf["vision_feature_select_strategy"],
                         num_additional_image_tokens=pconf["num_additional_image_tokens"],
                         chat_template=json.loads((published / "chat_template.json").read_text())["chat_template"])
    config = AutoConfig.from_pretrained(folder)
    model_cls = getattr(transformers, cfg["architectures"][0])
    torch.manual_seed(seed)
    model = model_cls(config)
    if hasattr(model.model, "image_newline"):
        with torch.no_grad():
            model.model.image_newline.normal_()
    return _sharpen_and_save(model, processor, folder)


# ---------------------------------------------------------------- published Qwen2-VL / Qwen2.5-VL / OneVision layouts
# Widths of the tiny copies of the newer families; everything else comes from the published files.
TINY_QWEN_VISION = {"qwen2_5_vl": {"hidden_size": 32, "intermediate_size": 64, "num_heads": 4, "depth": 2},
                    "qwen2_vl": {"embed_dim": 32, "num_heads": 4, "depth": 2}}
NEW_FAMILY_SIZE_FIELDS = SIZE_FIELDS | {"depth", "num_heads", "embed_dim", "out_hidden_size", "mrope_section"}


def _tiny_text_fields(text: dict, defaults: dict, text_layers: int | None) -> dict:
    """The decoder widths of a tiny copy: TINY_TEXT, the published ratio of query to KV heads, and M-RoPE
    sections scaled to the tiny head width (they must add up to half of it)."""
    heads = text.get("num_attention_heads", defaults["num_attention_heads"])
    kv = text.get("num_key_value_heads") or defaults.get("num_key_value_heads") or heads
    tiny = dict(TINY_TEXT, num_key_value_heads=max(1, TINY_TEXT["num_attention_heads"] * kv // heads))
    if text_layers is not None:
        tiny["num_hidden_layers"] = int(text_layers)
    if "head_dim" in text:
        tiny["head_dim"] = TINY_TEXT["hidden_size"] // TINY_TEXT["num_attention_heads"]
    rope = text.get("rope_scaling") or {}
    if "mrope_section" in rope:
        half = TINY_TEXT["hidden_size"] // TINY_TEXT["num_attention_heads"] // 2
        sections = [s * half // sum(rope["mrope_section"]) for s in rope["mrope_section"]]
        sections[0] += half - sum(sections)
        tiny["rope_scaling"] = {**rope, "mrope_section": sections}
    return tiny


def build_published_tiny_qwen_vl(folder, published, *, text_layers: int | None = None, vision_layers: int = 2,
                                 seed: int = 0):
    """A tiny copy of a published Qwen2-VL / Qwen2.5-VL checkpoint: its (flat) config.json with only the widths,
    the vision depth (and the decoder depth when ``text_layers`` is given) shrunk, its image processor settings
    (min/max pixels, patch, merge and temporal patch sizes, mean/std), chat template and a tokenizer that gives
    the published special tokens and prompt pieces their ids, saved like the real one. The processor is the
    torchvision-free image-only one of ``mustdrop.adapters.processors``.

    Qwen2.5-VL keeps its published ``fullatt_block_indexes`` and window size; with the tiny vision depth no block
    index is reached, so every tiny block uses window attention."""
    import json

    import transformers
    from transformers import AutoConfig, AutoImageProcessor

    from mustdrop.adapters.processors import image_only_processor_class

    published, folder = Path(published), Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((published / "config.json").read_text())
    model_type = cfg["model_type"]
    defaults = AutoConfig.for_model(model_type).text_config.to_dict()
    cfg.update(_tiny_text_fields(cfg, defaults, text_layers))
    vision = {**cfg["vision_config"], **TINY_QWEN_VISION[model_type], "depth": int(vision_layers)}
    vision["out_hidden_size" if model_type == "qwen2_5_vl" else "hidden_size"] = TINY_TEXT["hidden_size"]
    cfg["vision_config"] = vision
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    (folder / "preprocessor_config.json").write_text((published / "preprocessor_config.json").read_text())

    tokenizer = build_published_tokenizer(json.loads((published / "tokenizer_facts.json").read_text()))
    image_processor = AutoImageProcessor.from_pretrained(folder)
    template = json.loads((published / "chat_template.json").read_text())["chat_template"]
    processor = image_only_processor_class(model_type)(image_processor=image_processor, tokenizer=tokenizer,
                                                       chat_template=template)
    config = AutoConfig.from_pretrained(folder)
    torch.manual_seed(seed)
    model = getattr(transformers, cfg["architectures"][0])(config)
    return _sharpen_and_save(model, processor, folder)


def build_published_tiny_onevision(folder, published, *, text_layers: int | None = None, seed: int = 0):
    """A tiny copy of a published LLaVA-OneVision checkpoint (SigLIP 384/14 tiles, anyres_max_9 packing, Qwen2
    decoder): its config.json with only the widths (and the vision depth; the decoder depth when ``text_layers``
    is given) shrunk, its image processor (pinpoints, 384 x 384 tiles), processor settings, chat template and a
    tokenizer with the published <image> / <video> ids, saved like the real one; the processor is the
    torchvision-free image-only one of ``mustdrop.adapters.processors``."""
    import json

    from transformers import AutoConfig, AutoImageProcessor, LlavaOnevisionForConditionalGeneration

    from mustdrop.adapters.processors import image_only_processor_class

    published, folder = Path(published), Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((published / "config.json").read_text())
    text, vision = dict(cfg["text_config"]), dict(cfg["vision_config"])
    defaults = AutoConfig.for_model(text["model_type"]).to_dict()
    cfg["text_config"] = {**text, **_tiny_text_fields(text, defaults, text_layers)}
    cfg["vision_config"] = {**vision, **{k: v for k, v in TINY_VISION.items() if k != "projection_dim"}}
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    (folder / "preprocessor_config.json").write_text((published / "preprocessor_config.json").read_text())

    tokenizer = build_published_tokenizer(json.loads((published / "tokenizer_facts.json").read_text()))
    image_processor = AutoImageProcessor.from_pretrained(folder)
    pconf = json.loads((published / "processor_config.json").read_text())
    processor = image_only_processor_class("llava_onevision")(
        image_processor=image_processor, tokenizer=tokenizer, num_image_tokens=pconf["num_image_tokens"],
        vision_feature_select_strategy=pconf["vision_feature_select_strategy"], image_token=pconf["image_token"],
        video_token=pconf["video_token"],
        chat_template=json.loads((published / "chat_template.json").read_text())["chat_template"])
    config = AutoConfig.from_pretrained(folder)
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config)
    with torch.no_grad():
        model.model.image_newline.normal_()
    return _sharpen_and_save(model, processor, folder)


def build_published_tiny_any(folder, published, **kw):
    """``build_published_tiny`` and its newer-family siblings behind one call, chosen by the published
    config's model_type."""
    import json

    model_type = json.loads((Path(published) / "config.json").read_text())["model_type"]
    if model_type in ("qwen2_vl", "qwen2_5_vl"):
        return build_published_tiny_qwen_vl(folder, published, **kw)
    if model_type == "llava_onevision":
        return build_published_tiny_onevision(folder, published, **kw)
    return build_published_tiny(folder, published, **kw)
