"""The host interface: everything that differs between model families, behind one small class.

A host wraps one loaded transformers model + processor of one family and answers the questions the
shared run machinery (:mod:`mustdrop.run`) asks; the machinery itself (prefill state, stage-2 hooks,
stage-3 KV trim, decode loop and sampling, text-row scoring, trace assembly) is written once. A new
family is one module in ``mustdrop/hosts/`` subclassing :class:`Host`, plus its tests.

What a host says (abstract: must be written; the rest has a default for decoders with 1-D rotary
positions and ``self_attn.q_proj`` / ``self_attn.k_proj``, e.g. Llama, Qwen2, Mistral):

- ``num_images(inputs)`` / ``position_modes``   images in an input (one is run) / the positions it runs
- ``check(config)``                 refuse knobs this model cannot run (grid, depth, tower), with a message
- ``inputs(img, question)``         the processor's inputs (ids stay on the host) and the prompt text
- ``encode(inputs, img, config)``   run the hooked vision tower: stage 1a, 1b, vision-side baselines;
                                    returns a :class:`VisionResult` (features, geometry, key set)
- ``vision_meta()``                 what the trace records of the vision tower
- ``key_score_name()``              which score ranks stage 1b's key set on this tower
- ``query_proj(layer)``             the module whose output is a decoder layer's queries
- ``rows_rope(position_embeddings, attn)``   RoPE (+ attention scaling) of the text rows' queries
- ``prefill_kwargs(inputs, S, N0, T, vision)``  extra arguments of the prefill forward (e.g. 3-D position ids)
- ``shorten_positions(kwargs, state, reference)``   the positions / mask a later layer gets after a drop
- ``embeddings_at(pe, index)`` / ``position_ids_at(ids, index)``   positions of some sequence places
- ``decode_position_ids(start, n, device)``  the position ids of n decode steps from ``start``
- ``rotary(hidden, position_ids)``  the position embeddings of given position ids

Attributes every host sets: model, processor, text_config, vision_config, decoder_layers, num_layers,
vision_layers, rotary_emb, image_token_id, grid (the nominal patch grid side, used to check the
stage-1a window), has_cls, family, layout. A host that runs methods selecting before the LLM says
what its ``methods.VisionInputs`` lack (``vision_lacks``: {need: why}); ``method_refusal`` says why a
method that requires one cannot run here, in the method's words and the host's (the app leaves such
methods out of its choices; ``check`` refuses their configs).

Geometry: each crop the tower saw has a grid of (rows, cols) patches, numbered row-major and
concatenated crop after crop (global id = crop offset + row * cols + col). Each LLM vision token
covers some of them (``VisionResult.groups``) with weights (``VisionResult.weights``: the patch's share
of the token; None means equal shares, 1/k over its k patches: one patch with weight 1, a merged
window of k patches 1/k each). A 2 x 2 patch merger or an interpolated grid sets its own weights.
"""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass
class VisionResult:
    """What stage 1 hands the language model, with provenance for the trace.

    ``groups`` holds, for each vision token in the order the LLM sees it, the patches it covers as
    global ids (crop offset + row * cols + col), -1 padded; a row of -1 is a token that covers no
    patch (a LLaVA-NeXT newline row marker). ``crops`` lists per crop its name, ``grid`` [rows, cols],
    the mapping from original pixels to the crop's processed pixels, and its merged windows.
    """

    features: torch.Tensor                 # (N0, D) projected features entering the LLM
    groups: torch.Tensor                   # (N0, k) global patch ids, -1 padded
    key_tokens: torch.Tensor               # positions of the key set in the vision block, ascending
    key_score: torch.Tensor | None         # (N0,) the key-set score of each token (head mean)
    protected: torch.Tensor                # positions never dropped that are not key tokens (newlines)
    crops: list                            # per crop: {"name", "grid", "mapping", "merged_windows"}
    similarity: list                       # per crop: (rows/w, cols/w) window similarity or None
    baseline: dict | None = None           # a same-budget baseline's plan, parameters and scores
    weights: torch.Tensor | None = None    # (N0, k) float32 share of each covered patch; None: 1/k each
    merged: torch.Tensor | None = None     # (N0,) bool: the tokens stage 1a built; None: those covering several
                                           # patches (wrong where one token mixes patches unmerged: set it there)


class Host(ABC):
    """One model family's answers to the shared machinery (see the module docstring)."""

    family = ""
    label = ""                                   # the family in a message ("Qwen2-VL / Qwen2.5-VL")
    layout = "single"
    position_modes = ("reference", "original")   # the config.positions this host can run, default first
    vision_lacks: dict = {}                      # methods.VISION_NEEDS this host cannot offer: {need: why}

    def __init__(self, model, processor):
        self.model = model.eval()
        self.processor = processor
        cfg = model.config
        self.text_config = cfg.text_config
        self.vision_config = cfg.vision_config
        lm = model.model.language_model
        self.decoder_layers = lm.layers
        self.num_layers = len(self.decoder_layers)
        self.rotary_emb = lm.rotary_emb
        self._rope = sys.modules[type(self.decoder_layers[0].self_attn).__module__].apply_rotary_pos_emb
        self._rotate_half_rope = _is_rotate_half_rope(self._rope, self.decoder_layers[0].self_attn.head_dim)

    # ------------------------------------------------------------------ what every family writes
    @abstractmethod
    def check(self, config) -> None:
        """Raise ValueError naming the knob this model cannot run."""

    @abstractmethod
    def inputs(self, img, question: str) -> tuple[dict, str]:
        """(inputs, prompt): ``input_ids`` (1, L) on the host with one block of image placeholders,
        ``pixel_values`` and whatever else ``encode`` needs, on the model's device."""

    @abstractmethod
    def encode(self, inputs, img, config) -> VisionResult:
        """Run the vision tower with stage 1 attached; return the vision block for the LLM."""

    @abstractmethod
    def vision_meta(self) -> dict:
        """The trace's model.vision record."""

    @abstractmethod
    def key_score_name(self) -> str:
        """The score that ranks the key set (and vision-side baselines) on this tower, in words."""

    def method_refusal(self, method) -> str | None:
        """Why no config of ``method`` runs on this model (None: it runs): by default, a method that
        selects before the LLM relying on what this host's VisionInputs lack."""
        if not method.selects_before_llm:
            return None
        for need, use in method.requires.items():
            if need in self.vision_lacks:
                return (f"the {method.name} baseline is not defined on {self.label or self.family}: it {use}, "
                        f"and {self.vision_lacks[need]}")
        return None

    def refuse_method(self, config) -> None:
        """Raise ValueError with ``method_refusal``'s reason when the config's method cannot run here."""
        from .. import methods

        reason = self.method_refusal(methods.get(config.method))
        if reason:
            raise ValueError(reason)

    def num_images(self, inputs) -> int:
        """How many images ``inputs`` holds (the runner takes one)."""
        return int(inputs["pixel_values"].shape[0])

    # ------------------------------------------------------------------ decoder: queries and positions
    def query_proj(self, layer: int):
        """The module whose forward output is decoder layer ``layer``'s queries (before RoPE)."""
        return self.decoder_layers[layer].self_attn.q_proj

    def rows_rope(self, position_embeddings, attn):
        """RoPE with the attention scaling folded in for the text rows, ``f(q, start)``, from the
        full-length tables the first prune layer receives."""
        from ..run.textrows import RowsRope

        return RowsRope(position_embeddings, attn.scaling, self._rope if not self._rotate_half_rope else None,
                        grouped=getattr(attn, "num_key_value_groups", 1) > 1)

    def prefill_kwargs(self, inputs, S: int, N0: int, T: int, vision: VisionResult | None = None) -> dict:
        """Extra keyword arguments of the prefill forward, which gets ``inputs_embeds`` of S + N0 + T
        tokens (N0 vision tokens after stage 1) and no ids: none for 1-D positions (the model counts
        0..L-1 itself); a family with its own position layout (3-D rotary) passes its position ids.
        ``vision`` is the block the LLM gets (after any baseline's selection before the LLM): which
        patches each of its N0 tokens covers, hence where each sits."""
        return {}

    def embeddings_at(self, position_embeddings, index):
        """(cos, sin) at sequence places ``index`` (a slice or an index tensor)."""
        cos, sin = position_embeddings
        return cos[:, index], sin[:, index]

    def position_ids_at(self, position_ids, index):
        """Position ids at sequence places ``index`` (a slice or an index tensor)."""
        return position_ids[:, index]

    def shorten_positions(self, kwargs, state, reference: bool) -> dict:
        """The position embeddings, position ids and (4-D) mask of the survivors, for the layers after
        a drop (the decoder loop hands every layer the full-length ones). ``reference``: survivors'
        positions compacted to the first n, as the authors' code does; else each keeps its own."""
        index = slice(None, state.L) if reference else state.alive
        new = {"position_embeddings": self.embeddings_at(kwargs["position_embeddings"], index)}
        if kwargs.get("position_ids") is not None:
            new["position_ids"] = self.position_ids_at(kwargs["position_ids"], index)
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 4:
            idx = state.alive
            new["attention_mask"] = mask[:, :, idx][:, :, :, idx]
        return new

    def decode_position_ids(self, start: int, n: int, device) -> torch.Tensor:
        """Position ids of n decode steps whose first sits at sequence position ``start``."""
        return torch.arange(start, start + n, device=device).view(1, -1)

    def rotary(self, hidden, position_ids):
        """(cos, sin) of ``position_ids``, as the decoder's own rotary embedding computes them."""
        return self.rotary_emb(hidden, position_ids=position_ids)


def _is_rotate_half_rope(rope, head_dim: int) -> bool:
    """Whether the model's apply_rotary_pos_emb is the standard rotate-half form (checked on numbers)."""
    if head_dim % 2:
        return False
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 3, head_dim, generator=g)
    cos, sin = torch.randn(1, 3, head_dim, generator=g), torch.randn(1, 3, head_dim, generator=g)
    try:
        want = rope(q, q, cos, sin)[0]
    except Exception:  # noqa: BLE001 - a RoPE of another signature: use it through ``rope``
        return False
    half = head_dim // 2
    signed = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
    return torch.equal(want, q * cos.unsqueeze(1) + q.roll(half, -1) * signed.unsqueeze(1))
