"""Default layer groups (sed_dask.sources.layers.default_group) over real naming schemes, and the
labels' consumers: the param index (store) and the 'blocks' coarsening (grouping)."""

from __future__ import annotations

import pytest

from sed_dask.engine.grouping import block_label, resolve
from sed_dask.sources.layers import default_group
from sed_dask.store.trajectory import ParamIndex

# the flat model of issue 12: the old rules gave "other" for all but head.weight
FLAT = [
    ("emb.weight", "embeddings"),
    ("pos", "embeddings"),
    ("attn.in_proj_weight", "attn"),
    ("attn.out_proj.weight", "attn"),
    ("mlp.0.weight", "mlp"),
    ("mlp.2.bias", "mlp"),
    ("ln1.weight", "norm"),
    ("ln2.bias", "norm"),
    ("head.weight", "head"),
]

GPT2_HF = [
    ("transformer.wte.weight", "embeddings"),
    ("transformer.wpe.weight", "embeddings"),
    ("transformer.h.3.ln_1.weight", "block3.norm"),
    ("transformer.h.3.attn.c_attn.weight", "block3.attn"),
    ("transformer.h.3.attn.c_proj.bias", "block3.attn"),
    ("transformer.h.3.ln_2.weight", "block3.norm"),
    ("transformer.h.3.mlp.c_fc.weight", "block3.mlp"),
    ("transformer.h.3.mlp.c_proj.weight", "block3.mlp"),
    ("transformer.ln_f.weight", "final_norm"),
    ("lm_head.weight", "head"),
]

NANOGPT = [
    ("tok_emb.weight", "embeddings"),
    ("pos_emb.weight", "embeddings"),
    ("blocks.0.ln1.weight", "block0.norm"),
    ("blocks.0.attn.qkv.weight", "block0.attn"),
    ("blocks.0.attn.bias", "block0.attn"),
    ("blocks.0.mlp.fc.weight", "block0.mlp"),
    ("blocks.11.mlp.proj.weight", "block11.mlp"),
    ("ln_f.weight", "final_norm"),
    ("head.bias", "head"),
]

LLAMA_HF = [
    ("model.embed_tokens.weight", "embeddings"),
    ("model.layers.3.self_attn.q_proj.weight", "block3.attn"),
    ("model.layers.3.self_attn.k_proj.weight", "block3.attn"),
    ("model.layers.3.self_attn.o_proj.weight", "block3.attn"),
    ("model.layers.3.mlp.gate_proj.weight", "block3.mlp"),
    ("model.layers.3.mlp.down_proj.weight", "block3.mlp"),
    ("model.layers.3.input_layernorm.weight", "block3.norm"),
    ("model.layers.3.post_attention_layernorm.weight", "block3.norm"),
    ("model.norm.weight", "final_norm"),
    ("lm_head.weight", "head"),
]

LLAMA_META = [
    ("tok_embeddings.weight", "embeddings"),
    ("layers.3.attention.wq.weight", "block3.attn"),
    ("layers.3.attention.wo.weight", "block3.attn"),
    ("layers.3.feed_forward.w1.weight", "block3.mlp"),
    ("layers.3.attention_norm.weight", "block3.norm"),
    ("layers.3.ffn_norm.weight", "block3.norm"),
    ("norm.weight", "final_norm"),
    ("output.weight", "head"),
]

BERT = [
    ("bert.embeddings.word_embeddings.weight", "embeddings"),
    ("bert.embeddings.position_embeddings.weight", "embeddings"),
    ("bert.embeddings.LayerNorm.weight", "embeddings"),
    ("bert.encoder.layer.3.attention.self.query.weight", "block3.attn"),
    ("bert.encoder.layer.3.attention.self.value.bias", "block3.attn"),
    ("bert.encoder.layer.3.attention.output.dense.weight", "block3.attn"),
    ("bert.encoder.layer.3.intermediate.dense.weight", "block3.mlp"),
    ("bert.encoder.layer.3.output.dense.weight", "block3.mlp"),  # BERT's FFN output, not a head
    ("bert.pooler.dense.weight", "head"),
    ("classifier.weight", "head"),
]

TORCH_TRANSFORMER = [
    ("encoder.layers.0.self_attn.in_proj_weight", "block0.attn"),
    ("encoder.layers.0.self_attn.out_proj.weight", "block0.attn"),
    ("encoder.layers.0.linear1.weight", "block0.mlp"),
    ("encoder.layers.0.linear2.bias", "block0.mlp"),
    ("encoder.layers.0.norm1.weight", "block0.norm"),
    ("encoder.norm.weight", "final_norm"),
    ("decoder.layers.0.multihead_attn.in_proj_weight", "decoder.block0.attn"),
    ("decoder.layers.0.norm3.weight", "decoder.block0.norm"),
]

T5_AND_MORE = [
    ("encoder.block.0.layer.0.SelfAttention.q.weight", "block0.attn"),
    ("encoder.block.0.layer.1.DenseReluDense.wi.weight", "block0.mlp"),
    ("encoder.block.0.layer.0.layer_norm.weight", "block0.norm"),
    ("layers.0.mlp.0.weight", "block0.mlp"),  # block 0's mlp; its 0 is a Sequential index
    ("mlp.layers.0.weight", "mlp"),  # a ModuleList inside an MLP is no block
    ("blocks.2.gamma", "block2.other"),
    ("shared.weight", "other"),
]

TABLE = FLAT + GPT2_HF + NANOGPT + LLAMA_HF + LLAMA_META + BERT + TORCH_TRANSFORMER + T5_AND_MORE


@pytest.mark.parametrize("name,label", TABLE)
def test_default_group_naming_schemes(name, label):
    assert default_group(name) == label


def test_flat_model_gets_parts_not_other():
    # catches the old rules: this model came out as {"other", "head"}
    assert {default_group(n) for n, _ in FLAT} == {"embeddings", "attn", "mlp", "norm", "head"}


def _index(names):
    return ParamIndex.from_tensors([(n, (4, 3), "float32") for n in names])


def test_labels_reach_the_param_index_and_the_blocks_coarsening():
    names = [n for n, _ in LLAMA_HF]
    idx = _index(names)
    assert [e.group for e in idx] == [lab for _, lab in LLAMA_HF]
    ranges, _ = resolve(idx, "blocks", run="r")
    assert list(ranges) == ["embeddings", "block3", "final_norm", "head"]
    assert sum(hi - lo for lo, hi in ranges["block3"]) == 7 * 12  # its 7 block-3 tensors
    tt, _ = resolve(_index([n for n, _ in TORCH_TRANSFORMER]), "blocks", run="r")
    assert list(tt) == ["block0", "final_norm", "decoder.block0"]  # encoder and decoder apart
    assert block_label("decoder.block0.attn") == "decoder.block0" and block_label("attn") == "attn"
    flat, _ = resolve(_index([n for n, _ in FLAT]), "default", run="r")
    assert list(flat) == ["embeddings", "attn", "mlp", "norm", "head"]
