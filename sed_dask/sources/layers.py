"""Default layer groups: map a parameter name to a group label.

The reference code only knows ``blocks.N.`` names and silently finds nothing on HF/nanoGPT
names (docs/method.md §9, §15.3). These rules read a name component by component, so they work on
GPT-2 (HF and nanoGPT), Llama (HF and Meta), BERT, T5, torch ``nn.Transformer`` and flat models
alike. A block is a known container (``blocks``, ``h``, ``layers``, ``layer``, ``block`` …)
followed by an index: ``transformer.h.3.``, ``model.layers.3.``, ``encoder.layer.3.``. An index
after anything else is not a block: in ``mlp.0.weight`` the ``0`` is a position in an
``nn.Sequential``. Labels: ``embeddings``, ``block{i}.attn|mlp|norm|other`` (``decoder.block{i}…``
for blocks under a ``decoder``, so an encoder-decoder's block 0s stay apart), ``final_norm``,
``head``, and ``attn``, ``mlp``, ``norm`` for those parts outside any block, else ``other``.
"""

from __future__ import annotations

import re

_CONTAINERS = frozenset(
    {"blocks", "block", "h", "layers", "layer", "decoder_layers", "encoder_layers", "resblocks", "transformer_blocks"}
)
_EMBED = re.compile(
    r"(?:tok_|token_|word_|pos_|position_|positional_|patch_|token_type_)?"
    r"(?:emb|embed|embeds|embedding|embeddings)|tok_embeddings|embed_(?:tokens|positions|in)|"
    r"wte|wpe|pos"
)
_HEAD = re.compile(r"lm_head|head|heads|output|classifier|unembed|embed_out|score|pooler|cls")
_FINAL_NORM = re.compile(r"ln_f|norm_f|final_layer_norm|final_layernorm|final_norm|ln_out|norm")
_NORM = re.compile(r"ln(?:_?\d+|_[a-z]+)?|.*norm.*")
_ATTN = re.compile(
    r".*(?:attn|attention).*|(?:in|out|[qkvo])_proj(?:_weight|_bias)?|qkv|query|key|value|"
    r"w[qkvo]|[qkvo]"
)
_MLP = re.compile(
    r"mlp|ffn|feed_?forward|(?:c_)?fc(?:\d+|_\w+)?|linear\d+|(?:up|down|gate)_proj|w\d|"
    r"intermediate|dense_?relu_?dense|wi(?:_\d+)?|experts?|gate"
)


def _split_block(parts: list[str]) -> tuple[str | None, list[str]]:
    """``("block3" or "decoder.block3", components after the index)``, or ``(None, parts)``."""
    for j in range(len(parts) - 1):
        if parts[j].lower() in _CONTAINERS and parts[j + 1].isdigit():
            if _kind(parts[:j], in_block=True) is not None:
                break  # mlp.layers.0: a Sequential inside the MLP
            prefix = "decoder." if any(p.lower() == "decoder" for p in parts[:j]) else ""
            return f"{prefix}block{int(parts[j + 1])}", parts[j + 2 :]
    return None, parts


def _kind(parts: list[str], *, in_block: bool) -> str | None:
    """The first component that names a part decides: ``attention_norm`` is a norm, the
    ``LayerNorm`` under BERT's ``attention.output`` belongs to attention. Inside a block
    ``output`` is BERT's FFN output; outside, ``output`` is Meta Llama's head."""
    for p in parts:
        c = p.lower()
        if not in_block:
            if _EMBED.fullmatch(c):
                return "embeddings"
            if _HEAD.fullmatch(c):
                return "head"
            if _FINAL_NORM.fullmatch(c):
                return "final_norm"
        if _NORM.fullmatch(c):
            return "norm"
        if _ATTN.fullmatch(c):
            return "attn"
        if _MLP.fullmatch(c) or (in_block and c == "output"):
            return "mlp"
    return None


def default_group(name: str) -> str:
    """Group label of one parameter name (see the module docstring for the labels)."""
    block, rest = _split_block(name.split("."))
    if block is not None:
        return f"{block}.{_kind(rest, in_block=True) or 'other'}"
    return _kind(name.split("."), in_block=False) or "other"


def regex_groups(names, patterns: dict[str, str], *, default: str | None = "other") -> dict[str, str]:
    """Assign each name to the first user group whose regex ``search``es it.

    Names matching no pattern go to ``default``; with ``default=None`` they raise, so a typo
    in a pattern cannot silently empty a group.
    """
    compiled = [(g, re.compile(p)) for g, p in patterns.items()]
    out = {}
    for n in names:
        for g, rx in compiled:
            if rx.search(n):
                out[n] = g
                break
        else:
            if default is None:
                raise ValueError(f"parameter {n!r} matches none of the group patterns {list(patterns)}")
            out[n] = default
    return out
