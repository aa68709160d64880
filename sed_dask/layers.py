"""Default layer groups: map a parameter name to a group label.

The reference code only knows ``blocks.N.`` names and silently finds nothing on HF/nanoGPT
names (sed_spec §9, §15.3). These rules recognise the common naming schemes
(``blocks.N``, ``h.N``, ``layers.N``, ``layer.N``, ``block.N``) and fall back to ``other``.
"""
from __future__ import annotations

import re

_BLOCK = re.compile(r"(?:^|\.)(?:blocks|h|layers|layer|block|decoder_layers|encoder_layers)\.(\d+)\.(.*)$")
_EMBED = re.compile(r"(?:^|\.)(?:tok_emb|pos_emb|wte|wpe|embed_tokens|embed_positions|"
                    r"word_embeddings|position_embeddings|token_embedding|embed_in|embedding|embeddings)\b")
_HEAD = re.compile(r"(?:^|\.)(?:lm_head|head|embed_out|output|classifier|unembed)\b")
_FINAL_NORM = re.compile(r"(?:^|\.)(?:ln_f|norm_f|final_layer_norm|final_norm|norm|ln_out)\.")
_ATTN = re.compile(r"attn|attention|self_attn|q_proj|k_proj|v_proj|o_proj|qkv|c_attn")
_MLP = re.compile(r"mlp|ffn|feed_forward|fc\d?|c_fc|c_proj|up_proj|down_proj|gate_proj|w[123]\b")


def default_group(name: str) -> str:
    """Group label: ``embeddings``, ``block{i}.attn|mlp|norm|other``, ``final_norm``, ``head``, ``other``."""
    m = _BLOCK.search(name)
    if m:
        i, rest = int(m.group(1)), m.group(2)
        first = rest.split(".")[0]
        if "norm" in first.lower() or re.fullmatch(r"ln(?:_?\d+|_[a-z]+)?", first):
            return f"block{i}.norm"
        if _ATTN.search(rest):
            return f"block{i}.attn"
        if _MLP.search(rest):
            return f"block{i}.mlp"
        return f"block{i}.other"
    if _EMBED.search(name):
        return "embeddings"
    if _HEAD.search(name):
        return "head"
    if _FINAL_NORM.search(name + "."):
        return "final_norm"
    return "other"


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
