"""PLUG's own released layout, both ways: AliceMind's Megatron tensor-parallel shards <-> our parameters.

layout.py: the table of names and splits; write.py: `pretrain.export format=plug`; read.py: `init_from=plug:<dir>`.

    python -m pretrain.export run.dir=<run> out=<dir> format=plug [tp=8] [dtype=fp16] [step=<N>] [check=true]
    python -m pretrain.train stage=palm init_from=plug:<dir> ...   (also stage one, and pretrain.finetune)

Read from AliceMind's PLUG/ sources (model/modeling.py, mpu/layers.py, mpu/transformer.py, generate_plug.py,
load_checkpoint.py): the released weights are `mp_rank_00..07_model_states.pt`, one per tensor-parallel rank,
each a torch pickle whose ['module'] is that rank's state dict of `PalmForPreTraining` (the names of `layout`
below), loaded with `load_state_dict(strict=False)` into a model made `.half()` whose modules named *LayerNorm*
are then made float again (`fp32_layernorm`). load_state_dict copies, and so casts: the dtype in the files does not
matter to PLUG's loader, their shapes do (a size mismatch fails even with strict=False).

How a rank's piece is cut from the full tensor (`_initialize_affine_weight`): ColumnParallelLinear splits the
weight and its bias on dim 0, RowParallelLinear the weight on dim 1 (its bias is whole on every rank),
VocabParallelEmbedding dim 0 in contiguous blocks. With stride s the dim is cut into s * tp equal chunks and rank
r takes chunks r, r + tp, ..., r + (s - 1) tp: the fused [Q; K; V] (stride 3) leaves rank r [Q_r; K_r; V_r], the
queries, keys and values of its own heads, which its forward splits in three; the cross-attention's [K; V]
(stride 2) leaves [K_r; V_r]. Everything else (LayerNorms, position and token-type embeddings, pooler, MLM
transform, sentence head) is replicated. `cls.predictions.bias` is vocab-split like the embedding, and
`cls.predictions.decoder_weight` is the word embedding itself (a registered alias, so the state dict holds it
twice; written here sharing its storage). The vocab is padded to a multiple of 128 x tp (generate_plug.py:
`make_vocab_size_divisible_by` 128 times the model-parallel size; 21128 -> 21504 at tp 8).

Where PLUG's model and ours differ (the names map one to one; what is computed does not always):
- PLUG's embeddings always end in a LayerNorm (`bert.embeddings.LayerNorm`), also when pre-LN. Ours has one when
  post-LN, or pre-LN with model.embedding_norm=true (model=plug sets it): then the two map one to one, both ways,
  PLUG's trained one is read and ours is written, and PLUG's code computes what ours does. A pre-LN model with
  model.embedding_norm=false has none: exported, the shards hold the identity LayerNorm (weight 1, bias 0), which
  PLUG's code still applies (it normalises the embeddings), so it does not compute what ours does (config.json's
  pretrain_export.embedding_layernorm says so); read, shards whose embedding LayerNorm is not the identity (PLUG's
  trained weights) are refused, pointing to model.embedding_norm=true: dropping it changes the scale of the whole
  residual stream. Shards of our own export record which it was (config.json's pretrain_export), and are read only
  with the same setting: a LayerNorm at weight 1 and bias 0 still normalises, so it can be neither dropped nor
  added without changing the model. (PLUG's released shards record nothing; their LayerNorm is trained.)
- PLUG's sentence head reads [CLS]'s hidden state directly: its `bert.pooler.dense` is in the state dict but its
  forward never applies it (`pooled_output = sequence_output[:, 0]`). Ours is tanh(pooler(h)) then the classifier.
  The tensors are carried by name all the same (the sentence head is frozen in stage two; fine-tuning retrains
  the pooler).
- PLUG's decoder is always pre-LN: a post-LN stage two has no place in its layout (refused); a post-LN stage one
  maps onto PLUG's post-LN BertForPreTraining (`attention.output.LayerNorm`, `output.LayerNorm`).
- Our copy mechanism (model.copy) has no counterpart (refused on export; left fresh on import).
"""
