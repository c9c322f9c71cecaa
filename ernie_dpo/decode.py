"""A lean decode loop over the model's forward pass: continuous batching, in-place KV cache, per-prompt seeds.

Why not `model.generate`: on a CPU, PaddleFormers' generate makes batch 8 slower per reply than batch 1
(docs/benchmarks.md). What it does, and what this module does instead:
- padding: generate left-pads a batch to its longest prompt and runs until its longest reply ends. Here prompts are
  taken longest first (deterministic order), a finished reply frees its slot at once and the next prompt is
  prefilled on its own (no prompt is padded to another's length) and written INTO that slot, right-aligned at the
  batch's filled length (`admit`): no copy of the batch's cache. The cache is rebuilt (`combine`) only to grow it
  (to CHUNK..2 CHUNK - 1 free columns), to drop leading columns no running row needs (when a third of them are),
  and at the end;
- a decode step reads every column of the cache for every row, so a short prompt beside a long one would read the
  long one's width: the slots are split into GROUPS groups, each with its own cache (`GroupedCache`), the longest
  prompts in the first; one forward pass still serves every group (SmolLM2, 60 real test prompts: the decode
  steps 132 -> 114 s);
- its KV cache grows by concatenation, copying the whole cache at every step of every layer; here K/V live in
  buffers and each step writes one column in place (`SlotCache`);
- its attention expands K/V to every query head (`repeat_kv` copies the cache once per query head per step); here
  query heads are grouped per KV head instead (`grouped_attention`, same numbers, no copy); the mask is expanded to
  the scores' shape once per forward pass (Paddle's broadcast add is slow on a CPU), and prefill attends in query
  blocks, each only over the keys before it;
- its LM head runs over every prompt position in prefill (a 1000-token prompt: 1000 x vocab logits); here on
  the last position only;
- Paddle uses one CPU thread unless told otherwise; `load_model` sets all cores (devices.use_all_cpu_cores).
Sampling is the recipe's (top_p, temperature; no top_k), done where the logits are (`sample_tokens`), with each
prompt's own random stream (`prompt_seed`), so a prompt's reply does not depend on which prompts share its batch.
What can still differ is the float arithmetic of a batch of another shape (tests/test_generate.py measures it).
"""
import hashlib

import numpy as np

CHUNK = 64  # KV buffer growth step (columns)
GROUPS = 4  # decode slots form this many groups, each with a cache as wide as its own longest row (CPU; see generate)
GROUPED = "ernie_dpo_grouped"  # name under which grouped_attention is registered with the engine


def prompt_seed(seed, prompt_id):
    """A prompt's own sampling seed: from infer.seed and the prompt's id, never from its position or batch."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{prompt_id}".encode()).digest()[:4], "big") & 0x7FFFFFFF


# ------------------------------------------------------------------------------------------------ sampling


CANDIDATES = 64  # the nucleus is sampled from the most probable CANDIDATES tokens (see sample_tokens)


def sample_tokens(logits, temperature, top_p, uniforms):
    """One token id per row of logits ([B, vocab] Paddle tensor, on the model's device): temperature, then nucleus
    (top_p) sampling; temperature 0 = greedy. uniforms: one number in [0, 1) per row, drawn from that row's own
    random stream (so a row's tokens do not depend on the rows beside it). Returns a numpy int array [B].

    Nucleus as in Hugging Face's TopPLogitsWarper: keep the most probable tokens while the probability of the tokens
    before each one is < top_p (at least one), then draw from them in proportion. Everything runs where the logits
    are: only B token ids come back to the host, never the [B, vocab] logits (on a GPU a copy and a sync of
    B x 103 424 floats per step otherwise). The nucleus is taken from the CANDIDATES most probable tokens; a row whose
    candidates hold less than top_p of the probability (a very flat distribution) is sampled over its whole
    vocabulary instead (sample_token, on the host: rare).
    """
    import paddle

    if temperature <= 0:
        return paddle.argmax(logits, axis=-1).numpy().astype("int64")
    z = logits.astype("float32") / temperature
    k = min(CANDIDATES, z.shape[-1])
    top, ids = paddle.topk(z, k=k, axis=-1)  # sorted, most probable first
    # log-sum-exp from the row maximum (topk's first column): Paddle 3.3's CPU logsumexp kernel took 4.7 ms for
    # [16, 49 152], this 1.4 ms (the same values on the benchmark's logits)
    lse = top[:, :1] + paddle.log(paddle.exp(z - top[:, :1]).sum(axis=-1, keepdim=True))
    p = paddle.exp(top - lse)
    cum = paddle.cumsum(p, axis=-1)
    keep = (cum - p) < top_p  # the tokens before this one hold < top_p: in the nucleus (the first always is)
    kept = paddle.where(keep, p, paddle.zeros_like(p))
    mass = kept.sum(axis=-1, keepdim=True)
    u = paddle.to_tensor(np.asarray(uniforms, dtype="float32")[:, None], place=logits.place) * mass
    pick = ((paddle.cumsum(kept, axis=-1) <= u) & keep).astype("int64").sum(axis=-1)
    n = keep.astype("int64").sum(axis=-1)
    pick = paddle.minimum(pick, n - 1)
    chosen = paddle.take_along_axis(ids, pick[:, None], axis=-1)[:, 0]
    out = chosen.numpy().astype("int64")
    flat = (cum[:, -1] < top_p).numpy() if k < z.shape[-1] else np.zeros(len(out), dtype=bool)
    for r in np.flatnonzero(flat):  # rare: the whole vocabulary, on the host, same uniform
        out[r] = sample_token(z[r].numpy() * temperature, temperature, top_p, uniforms[r])
    return out


def sample_token(logits, temperature, top_p, u):
    """sample_tokens for one row of logits (numpy [vocab]), over the whole vocabulary; u: a uniform in [0, 1).
    Ties are ordered by token id."""
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    z -= z.max()
    p = np.exp(z)
    p /= p.sum()
    order = np.lexsort((np.arange(p.size), -p))
    cum = np.cumsum(p[order])
    n = min(int(np.searchsorted(cum, top_p, side="left")) + 1, order.size)
    kept = cum[:n]
    return int(order[min(int(np.searchsorted(kept, u * kept[-1], side="right")), n - 1)])


# ------------------------------------------------------------------------------------------------ attention


QUERY_BLOCK = 512  # prefill attends in blocks of this many queries
MASK_CACHE_BYTES = 512 << 20  # expanded prefill masks kept across the layers of one pass, at most


def grouped_attention(module, query, key, value, attention_mask=None, dropout=0.0, scaling=None, **kwargs):
    """Eager attention without repeat_kv: query heads that share a KV head are stacked along the query axis.

    query [B, Hq, q, D], key/value [B, Hkv, T, D], mask [B, 1, q, >=T] (additive). Query head h reads KV head
    h // (Hq / Hkv), the convention of repeat_kv and of the engine's fused QKV layouts.
    Prefill (q > 1) runs in blocks of QUERY_BLOCK queries, each against the keys up to its last query only (the
    later ones are masked anyway): a 3000-token prompt needs 3 x 512 x 3000 scores at a time instead of 3 x 3000 x
    3000, and about half the work.
    """
    import paddle

    if isinstance(key, GroupKV):  # a decode step over groups of rows, each with its own cache width (generate)
        return _attend_groups(query * scaling, key, value), None
    b, hq, q, d = query.shape
    hkv, t = key.shape[1], key.shape[2]
    rep = hq // hkv
    # the scale on the queries (q x d numbers), not on the scores (q x t): 15x less work for a 1000-token prompt
    qs = query * scaling
    if attention_mask is None and kwargs.get("attn_mask_startend_row_indices") is not None:
        # training (DPO): the engine passes its mask in sparse form (the rejected answer must not see the chosen
        # one); made dense once per forward pass, not once per layer as the engine's eager attention does
        attention_mask = _dense_mask(kwargs["attn_mask_startend_row_indices"], qs.dtype)
    source = attention_mask
    if attention_mask is not None:
        m = attention_mask[:, :, :, :t]
    elif q > 1:
        # The engine passes no mask when no position is padded and the backend is not "eager" (flash kernels are
        # causal by themselves): query i sits at position t - q + i and sees keys up to there.
        m = source = _causal_mask(q, t, qs.dtype)
    else:
        m = None
    if q == 1:  # decode: [b, hkv, rep, t] scores, the mask expanded to them once per step (a broadcast add is slow)
        w = paddle.matmul(qs.reshape([b, hkv, rep, d]), key, transpose_y=True)
        if m is not None:
            w.add_(_expanded_mask(m, source, 0, 1, t, hkv, rep))
        return _weighted(w, value, query.dtype).reshape([b, 1, hq * d]), None
    blocks = []
    for start in range(0, q, QUERY_BLOCK):
        end = min(q, start + QUERY_BLOCK)
        seen = t - q + end  # keys visible to the block's last query
        qb = qs[:, :, start:end].reshape([b, hkv, rep * (end - start), d])
        w = paddle.matmul(qb, key[:, :, :seen], transpose_y=True)
        if m is not None:
            # in place, with the mask expanded to the scores' shape once per forward pass: Paddle's CPU add is slow
            # when it broadcasts a mask over heads (37 ms a layer for 1000 tokens)
            w.add_(_expanded_mask(m, source, start, end, seen, hkv, rep))
        blocks.append(_weighted(w, value[:, :, :seen], query.dtype).reshape([b, hq, end - start, d]))
    out = blocks[0] if len(blocks) == 1 else paddle.concat(blocks, axis=2)
    return out.transpose([0, 2, 1, 3]).reshape([b, q, hq * d]), None


def _attend_groups(qs, keys, values):
    """One decode step's attention, group by group: each group's queries (a run of batch rows) against its own K/V
    buffers and its own mask, so a row beside a long one no longer reads that row's width of columns."""
    import paddle

    hq, d = qs.shape[1], qs.shape[3]
    outs, row = [], 0
    for g, (k, v) in enumerate(zip(keys, values)):
        n, hkv = k.shape[0], k.shape[1]
        w = paddle.matmul(qs[row:row + n].reshape([n, hkv, hq // hkv, d]), k, transpose_y=True)
        w.add_(keys.cache.expanded_mask(g, hkv, hq // hkv, w.dtype))
        outs.append(_weighted(w, v, qs.dtype).reshape([n, 1, hq * d]))
        row += n
    return outs[0] if len(outs) == 1 else paddle.concat(outs, axis=0)


def _weighted(w, value, dtype):
    """softmax(scores) @ values, softmax in float32."""
    import paddle

    if w.dtype == paddle.float32:
        w = paddle.nn.functional.softmax(w, axis=-1)
    else:
        w = paddle.nn.functional.softmax(w, axis=-1, dtype="float32").astype(dtype)
    return paddle.matmul(w, value)


_MASK = {}
_DENSE = {}


def _dense_mask(startend, dtype):
    """The engine's sparse attention mask (attn_mask_startend_row_indices) as an additive [b, 1, t, t] mask."""
    from paddleformers.utils.masking_utils import _gen_from_sparse_attn_mask_indices

    if _DENSE.get("source") is not startend:
        _DENSE.clear()  # (additive already: 0 where allowed, -1e6 where masked)
        _DENSE.update(source=startend, mask=_gen_from_sparse_attn_mask_indices(startend, dtype, None))
    return _DENSE["mask"]


_CAUSAL = {}


def _causal_mask(q, t, dtype):
    """The additive causal mask [1, 1, q, t] for q queries at the last positions of t keys: built once for each
    shape (not once per layer: it is the same for every layer of a forward pass, which also lets _expanded_mask
    reuse its expansion across the layers)."""
    import paddle

    key = (q, t, str(dtype), str(paddle.get_device()))
    if key not in _CAUSAL:
        _CAUSAL.clear()
        allowed = np.tril(np.ones((q, t), dtype=bool), k=t - q)
        m = paddle.to_tensor(np.where(allowed, 0.0, np.finfo(np.float32).min).astype("float32"))
        _CAUSAL[key] = m.astype(dtype).reshape([1, 1, q, t])
    return _CAUSAL[key]


def _expanded_mask(m, source, start, end, seen, hkv, rep):
    """Rows [start, end) and columns [0, seen) of the mask m [b, 1, q, t], tiled to the grouped scores' shape
    [b, hkv, rep * (end - start), seen]. Every layer of a forward pass gets the same mask tensor `source` (m is a new
    slice of it in each layer, so the cache is keyed on source, the width t and the head layout), so each block is
    expanded once per pass (the cache holds the last pass only). The causal mask of a mask-less prefill is one cached
    tensor per shape (_causal_mask): the same source then comes back in later passes, possibly of another model
    (the benchmarks and the test session load several), hence hkv and rep in the key."""
    key = (source, m.shape[-1], hkv, rep)
    old = _MASK.get("source")
    if old is None or old[0] is not source or old[1:] != key[1:]:
        _MASK.clear()
        _MASK.update(source=key, bytes=0)
    if (start, end, seen) in _MASK:
        return _MASK[(start, end, seen)]
    block = (m[:, :, start:end, :seen].unsqueeze(2).tile([1, hkv, rep, 1, 1])
             .reshape([m.shape[0], hkv, rep * (end - start), seen]))
    size = int(block.size) * block.element_size()
    # Kept for the next layers only while the pass's blocks fit MASK_CACHE_BYTES: a long prompt's blocks would
    # otherwise all be held at once (memory growing with the square of the prompt length); past the budget each
    # layer expands its block again (slower, but one block at a time: linear in the prompt length)
    if _MASK["bytes"] + size <= MASK_CACHE_BYTES:
        _MASK[(start, end, seen)] = block
        _MASK["bytes"] += size
    return block


def use_grouped_attention(model):
    """Register grouped_attention with the engine and switch every attention layer of `model` to it."""
    from paddleformers.nn.attention.interface import AttentionInterface

    AttentionInterface._global_mapping[GROUPED] = grouped_attention
    model.config._attn_implementation = GROUPED
    for layer in model.sublayers():
        if hasattr(layer, "attn_implementation"):  # Ernie4_5 reads the name once at construction
            layer.attn_implementation = GROUPED


# ------------------------------------------------------------------------------------------------ KV cache


class SlotCache:
    """Per layer K, V buffers [B, H, capacity, D] for a batch whose rows are left-padded to a common length.

    prefill: update() stores the prompt's K/V at columns [0, T) and returns them as they are.
    decode:  update() writes the new column at `length` in place and returns the whole buffers; columns not yet
             written are masked out by the attention mask, whose length is the capacity. The model sizes its mask
             from get_seq_length() + 1, so in decode get_seq_length() reports capacity - 1.
    """

    def __init__(self, n_layers):
        self.keys = [None] * n_layers
        self.values = [None] * n_layers
        self.length = 0  # columns filled (shared by all rows)
        self.decoding = False

    @property
    def capacity(self):
        return self.keys[0].shape[2]

    def get_seq_length(self, layer_idx=0):
        return self.capacity - 1 if self.decoding else 0

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
        import paddle

        if not self.decoding:  # prefill of a fresh batch
            b, h, t, d = key_states.shape
            shape = [b, h, _round_up(t + 1), d]
            self.keys[layer_idx] = paddle.zeros(shape, dtype=key_states.dtype)
            self.values[layer_idx] = paddle.zeros(shape, dtype=value_states.dtype)
            self.keys[layer_idx][:, :, :t] = key_states
            self.values[layer_idx][:, :, :t] = value_states
            return key_states, value_states
        self.keys[layer_idx][:, :, self.length:self.length + 1] = key_states
        self.values[layer_idx][:, :, self.length:self.length + 1] = value_states
        return self.keys[layer_idx], self.values[layer_idx]


def _round_up(n):
    """Capacity for n filled columns: room for CHUNK to 2 * CHUNK - 1 more, in multiples of CHUNK. Every decode step
    reads the whole capacity (unwritten columns are masked, not skipped: a sliced view makes Paddle's CPU matmul 5x
    slower), so slack costs on every step while a rebuild (one copy of the cache) costs once per CHUNK steps; a
    quarter of the length as slack, as before, read ~12% more of a long batch's cache at every step."""
    return (n + 2 * CHUNK - 1) // CHUNK * CHUNK


class GroupKV(list):
    """One layer's K (or V) buffers of every group, as GroupedCache.update hands them to the attention."""

    def __init__(self, tensors, cache):
        super().__init__(tensors)
        self.cache = cache


class GroupedCache:
    """The cache the model sees during a decode step over several groups of rows (Batches, each with its own
    SlotCache: its own width, filled length and mask). update() writes each group's rows of the new K/V column into
    that group's buffers; the attention (_attend_groups) reads each group's buffers with its own mask. The model's
    own mask is not used (the step passes none; get_seq_length() 0 keeps the model from sizing one)."""

    def __init__(self, batches):
        self.batches = batches
        self.masks = {}  # each group's additive mask expanded to its scores' shape, built once per step

    def get_seq_length(self, layer_idx=0):
        return 0

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
        keys, values, row = [], [], 0
        for b in self.batches:
            n = len(b)
            k, v = b.cache.update(key_states[row:row + n], value_states[row:row + n], layer_idx)
            keys.append(k)
            values.append(v)
            row += n
        return GroupKV(keys, self), GroupKV(values, self)

    def expanded_mask(self, g, hkv, rep, dtype):
        import paddle

        if (g, hkv, rep) not in self.masks:
            m = self.batches[g].mask
            add = paddle.to_tensor(np.where(m, 0.0, np.finfo(np.float32).min).astype("float32")).astype(dtype)
            self.masks[(g, hkv, rep)] = add.reshape([m.shape[0], 1, 1, m.shape[1]]).tile([1, hkv, rep, 1])
        return self.masks[(g, hkv, rep)]


class Batch:
    """The rows decoded together: their cache, attention mask (numpy, [B, capacity]) and per-row state.
    A row of None is a free slot: decoded along (its mask is empty), its output ignored, until a prompt takes it."""

    def __init__(self, cache, mask, rows, positions, last):
        self.cache, self.mask, self.rows = cache, mask, rows
        self.positions = positions  # next position id of each row
        self.last = last  # last sampled token of each row

    def __len__(self):
        return len(self.rows)

    def free(self):
        return [r for r, row in enumerate(self.rows) if row is None]

    def first_used_column(self):
        used = self.mask[:, :self.cache.length].any(axis=0)
        return int(np.argmax(used)) if used.any() else self.cache.length


def widen(new, slots, n_layers):
    """A batch of `slots` rows whose first rows are `new`'s (a fresh prefill), the rest free slots."""
    import paddle

    b = len(new)
    cache = SlotCache(n_layers)
    cache.length, cache.decoding = new.cache.length, True
    for layer in range(n_layers):
        for src, dst in ((new.cache.keys, cache.keys), (new.cache.values, cache.values)):
            k = src[layer]
            dst[layer] = paddle.concat([k, paddle.zeros([slots - b] + k.shape[1:], dtype=k.dtype)]) if slots > b else k
    pad = slots - b
    return Batch(cache, np.concatenate([new.mask, np.zeros((pad, new.mask.shape[1]), dtype=bool)]),
                 new.rows + [None] * pad, np.concatenate([new.positions, np.zeros(pad, dtype="int64")]),
                 np.concatenate([new.last, np.zeros(pad, dtype="int64")]))


def admit(batch, slot, new, r, n_layers):
    """Row r of a fresh prefill goes into free slot `slot` of the running batch, IN PLACE: its K/V right-aligned at
    the batch's filled length (every row writes its next column there). No copy of the batch's cache, unlike
    rebuilding the batch (combine). Returns False when the prompt is longer than that length (then combine)."""
    used = int(new.mask[r].sum())  # the prompt's columns, right-aligned at new.cache.length
    end, t = batch.cache.length, new.cache.length
    if used > end:
        return False
    for layer in range(n_layers):
        batch.cache.keys[layer][slot:slot + 1, :, end - used:end] = new.cache.keys[layer][r:r + 1, :, t - used:t]
        batch.cache.values[layer][slot:slot + 1, :, end - used:end] = new.cache.values[layer][r:r + 1, :, t - used:t]
    batch.mask[slot] = False
    batch.mask[slot, end - used:end] = True
    batch.rows[slot], batch.positions[slot], batch.last[slot] = new.rows[r], new.positions[r], new.last[r]
    return True


def combine(parts, n_layers):
    """One Batch from several (rows kept from the running batch + newly prefilled ones): right-aligned at the
    longest filled length, leading columns no row uses dropped, room for CHUNK..2 CHUNK - 1 more columns (_round_up)."""
    import paddle

    parts = [p for p in parts if len(p)]
    starts = [int(np.argmax(p.mask[:, :p.cache.length].any(axis=0))) for p in parts]  # first used column
    used = [p.cache.length - s for p, s in zip(parts, starts)]
    length = max(used)
    cap = _round_up(length)
    cache = SlotCache(n_layers)
    cache.length, cache.decoding = length, True
    b = sum(len(p) for p in parts)
    mask = np.zeros((b, cap), dtype=bool)

    def laid_out(p, s, u, buf):
        """part p's filled columns [s, length_p) of one layer's buffer, right-aligned at `length`, zeros around:
        built by one concat (zeros + slice assignment wrote every byte twice: 2.4x slower on a 3500-column batch)"""
        k = buf[:, :, s:p.cache.length]
        pieces = [paddle.zeros([k.shape[0], k.shape[1], n, k.shape[3]], dtype=k.dtype) if n else None
                  for n in (length - u, cap - length)]
        return paddle.concat([x for x in (pieces[0], k, pieces[1]) if x is not None], axis=2)

    for layer in range(n_layers):
        for attr in ("keys", "values"):
            blocks = [laid_out(p, s, u, getattr(p.cache, attr)[layer]) for p, s, u in zip(parts, starts, used)]
            getattr(cache, attr)[layer] = blocks[0] if len(blocks) == 1 else paddle.concat(blocks, axis=0)
    row = 0
    for p, s, u in zip(parts, starts, used):
        mask[row:row + len(p), length - u:length] = p.mask[:, s:p.cache.length]
        row += len(p)
    return Batch(cache, mask, [r for p in parts for r in p.rows], np.concatenate([p.positions for p in parts]),
                 np.concatenate([p.last for p in parts]))


def select(batch, keep):
    """The rows `keep` (indices) of a batch, in a new cache: the batch itself is left as it was, because the rows of
    a prefill of several prompts are taken from it one by one (prefill_batch > 1, the GPU setting)."""
    import paddle

    idx = paddle.to_tensor(np.asarray(keep, dtype="int64"))
    c = SlotCache(len(batch.cache.keys))
    c.length, c.decoding = batch.cache.length, batch.cache.decoding
    c.keys = [paddle.index_select(k, idx, axis=0) for k in batch.cache.keys]
    c.values = [paddle.index_select(v, idx, axis=0) for v in batch.cache.values]
    return Batch(c, batch.mask[keep], [batch.rows[i] for i in keep], batch.positions[keep], batch.last[keep])


# ------------------------------------------------------------------------------------------------ the loop


class Row:
    """One prompt being answered."""

    def __init__(self, index, ids, seed):
        self.index, self.prompt_len = index, len(ids)
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.out = []


def lm_logits(model, hidden):
    """The LM head's logits for `hidden`. In the training engine on a CPU the head is fused with the loss
    (engine.CPU_SETTINGS: use_fused_head_and_loss_fn, so the loss computes logits only where an answer token is
    scored): lm_head then returns its inputs, and this applies it as the engine's unfused path does."""
    head = model.lm_head
    if head.config.get("use_fused_head_and_loss_fn", False):
        from paddleformers.nn.criterion.loss_utils import calc_lm_head_logits

        return calc_lm_head_logits(head.config, hidden, head.weight, head.bias, None, training=False,
                                   gather_hidden_states=True)
    return head(hidden)


def _forward(model, ids, positions, mask, cache, last_only=True):
    """Hidden state of the last position -> logits [B, vocab] (a Paddle tensor on the model's device); with
    last_only=False also the hidden states of every position."""
    import paddle

    out = model.model(input_ids=paddle.to_tensor(ids), position_ids=paddle.to_tensor(positions),
                      attention_mask=None if mask is None else paddle.to_tensor(mask), past_key_values=cache,
                      use_cache=True, return_dict=True)
    logits = lm_logits(model, out.last_hidden_state[:, -1:, :])[:, -1, :]
    return logits if last_only else (logits, out.last_hidden_state)


def prefill(model, n_layers, items, pad_id, answer=None):
    """Prefill prompts [(index, ids, seed), ...] together (left-padded to the longest). Returns (Batch, logits).

    answer (one prompt only): answer ids to score in the same forward pass, returned as a third value (sum of log
    p(answer token | what precedes it), count). The pass runs over prompt + answer: the model is causal, so the
    prompt's K/V and its last position's logits are the prompt's own (up to float rounding); the answer's columns
    are then dropped from the cache. The held-out likelihood of the length probes scores each validation prompt's
    chosen answer this way: one forward pass over the prompt instead of two (the probe's prefill and the scoring)."""
    t = max(len(ids) for _, ids, _ in items)
    ids = np.full((len(items), t), pad_id, dtype="int64")
    mask = np.zeros((len(items), t), dtype=bool)
    for r, (_, row_ids, _) in enumerate(items):
        ids[r, t - len(row_ids):] = row_ids
        mask[r, t - len(row_ids):] = True
    positions = np.maximum(mask.cumsum(axis=1) - 1, 0)
    cache = SlotCache(n_layers)
    score = None
    if answer is None:
        logits = _forward(model, ids, positions, mask, cache)
    else:
        if len(items) != 1:
            raise ValueError("prefill scores an answer for one prompt at a time")
        a = np.asarray(answer, dtype="int64")[None, :]
        whole = np.concatenate([ids, a], axis=1)
        _, hidden = _forward(model, whole, np.arange(whole.shape[1], dtype="int64")[None, :],
                             np.ones(whole.shape, dtype=bool), cache, last_only=False)
        logits = lm_logits(model, hidden[:, t - 1:t, :])[:, -1, :]
        score = (_answer_logp_sum(model, hidden, t - 1, answer), len(answer))
        cap = _round_up(t + 1)  # the prompt's columns only, with the usual room to decode into
        cache.keys = [k[:, :, :cap].clone() for k in cache.keys]
        cache.values = [v[:, :, :cap].clone() for v in cache.values]
    cache.length, cache.decoding = t, True
    full = np.zeros((len(items), cache.capacity), dtype=bool)
    full[:, :t] = mask
    rows = [Row(i, row_ids, seed) for i, row_ids, seed in items]
    batch = Batch(cache, full, rows, mask.sum(axis=1).astype("int64"), np.zeros(len(items), dtype="int64"))
    return (batch, logits) if answer is None else (batch, logits, score)


def generate(model, prompts, seeds, stop_ids, max_new_tokens, temperature, top_p, batch_size, pad_id, max_len=None,
             on_done=None, prefill_batch=1, n_groups=None, answers=None):
    """Answer every prompt (lists of token ids). Calls on_done(index, new_ids, finish_reason) as each reply ends
    ("eos": a stop token, not included; "length": max_new_tokens or the model's context reached).

    Prompts are started longest first; at most batch_size are decoded together, a finished one is replaced at once
    by the next waiting prompt (prefilled `prefill_batch` at a time: 1 on a CPU, where prefill is compute-bound and
    padding is pure waste; more on a GPU). The batch_size slots are split into n_groups groups (default GROUPS),
    each a Batch with its own cache: a decode step reads every column of its group's cache for every row of it, so
    the longest prompts (the first ones) share a group and the shorter ones no longer read their width. Returns
    {index: (new_ids, finish_reason)}.
    answers: {index: answer ids} to score while their prompts are prefilled (`prefill`); then returns
    (replies, {index: (sum of the answer's token log-probs, count)}).
    """
    import paddle

    n_layers = model.config.num_hidden_layers
    stop = set(stop_ids)
    waiting = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
    results, scores = {}, {}
    n_groups = max(1, min(GROUPS if n_groups is None else n_groups, batch_size))
    sizes = [batch_size // n_groups + (g < batch_size % n_groups) for g in range(n_groups)]
    groups = [None] * n_groups  # a Batch per group of slots, None while the group holds no row

    def finish(row, reason):
        results[row.index] = (row.out, reason)
        if on_done is not None:
            on_done(row.index, row.out, reason)

    def take(logits, rows):
        """Sample one token per row; return the rows still running (indices)."""
        keep = []
        uniforms = [row.rng.random() for row in rows] if temperature > 0 else [0.0] * len(rows)
        for r, (row, tok) in enumerate(zip(rows, sample_tokens(logits, temperature, top_p, uniforms).tolist())):
            if tok in stop:
                finish(row, "eos")
                continue
            row.out.append(tok)
            limit = max_len is not None and row.prompt_len + len(row.out) >= max_len
            if len(row.out) >= max_new_tokens or limit:
                finish(row, "length")
                continue
            keep.append(r)
        return keep

    def free_slots():
        """(group, slot) of every free slot, the first group's first: the longest prompts fill the first groups"""
        return [(g, s) for g, b in enumerate(groups) for s in (range(sizes[g]) if b is None else b.free())]

    with paddle.no_grad():
        while waiting or any(b is not None for b in groups):
            free = free_slots()
            if free and waiting:
                # fill every free slot: prefill the next prompts (longest first), sample their first token
                items = [(i, prompts[i], seeds[i]) for i in waiting[:len(free)]]
                del waiting[:len(items)]
                step = 1 if answers else prefill_batch  # a prompt with an answer to score is prefilled alone
                for k in range(0, len(items), step):
                    part = items[k:k + step]
                    if answers and part[0][0] in answers:
                        new, logits, scores[part[0][0]] = prefill(model, n_layers, part, pad_id, answers[part[0][0]])
                    else:
                        new, logits = prefill(model, n_layers, part, pad_id)
                    keep = take(logits, new.rows)
                    new.last = np.array([row.out[-1] if row.out else 0 for row in new.rows], dtype="int64")
                    for r in keep:
                        g, slot = free_slots()[0]
                        batch = groups[g]
                        if batch is None:
                            groups[g] = widen(select(new, [r]), sizes[g], n_layers)
                        elif not admit(batch, slot, new, r, n_layers):
                            # longer than the group's running rows' span (not with longest-first order): rebuild
                            live = [j for j, row in enumerate(batch.rows) if row is not None]
                            groups[g] = widen(combine([select(batch, live), select(new, [r])], n_layers), sizes[g],
                                              n_layers)
                continue
            # one decode step for every slot of every group
            for g, batch in enumerate(groups):
                if batch is not None and batch.cache.length >= batch.cache.capacity:
                    groups[g] = combine([batch], n_layers)  # out of room: CHUNK more columns, unused leading dropped
            active = [b for b in groups if b is not None]
            for batch in active:
                batch.mask[:, batch.cache.length] = True
            logits = _forward(model, np.concatenate([b.last for b in active])[:, None],
                              np.concatenate([b.positions for b in active])[:, None], None, GroupedCache(active))
            live, row = [], 0  # (batch, slot, row of the logits) of every running row
            for batch in active:
                batch.cache.length += 1
                batch.positions = batch.positions + 1
                live += [(batch, r, row + r) for r, x in enumerate(batch.rows) if x is not None]
                row += len(batch)
            picked = logits[paddle.to_tensor([x[2] for x in live])] if len(live) < row else logits
            kept = set(take(picked, [batch.rows[r] for batch, r, _ in live]))
            for k, (batch, r, _) in enumerate(live):
                if k in kept:
                    batch.last[r] = batch.rows[r].out[-1]
                else:  # finished: the slot is free
                    batch.rows[r] = None
                    batch.mask[r] = False
            for g, batch in enumerate(groups):
                if batch is None:
                    continue
                if not waiting:
                    # the last prompts: drop finished rows once a quarter of the group is free, and columns no row needs
                    alive = [r for r, x in enumerate(batch.rows) if x is not None]
                    if not alive:
                        groups[g] = None
                    elif len(batch) - len(alive) >= max(1, len(batch) // 4):
                        groups[g] = combine([select(batch, alive)], n_layers)
                elif batch.first_used_column() > max(2 * CHUNK, batch.cache.capacity // 3):
                    groups[g] = combine([batch], n_layers)  # a third of the columns no running row needs any more
    return results if answers is None else (results, scores)


def answer_logps(model, prompt_ids, answer_ids):
    """Sum and count of log p(answer token | everything before it) under `model` (a causal LM, eval mode)."""
    import paddle

    ids = list(prompt_ids) + list(answer_ids)
    with paddle.no_grad():
        hidden = model.model(input_ids=paddle.to_tensor([ids]), return_dict=True).last_hidden_state
        return _answer_logp_sum(model, hidden, len(prompt_ids) - 1, answer_ids), len(answer_ids)


def _answer_logp_sum(model, hidden, at, answer_ids):
    """Sum of log p(answer token) from the hidden states [1, T, H] of a pass over prompt + answer; `at`: the position
    that predicts the first answer token (the prompt's last). Logits only where an answer token is predicted, in
    chunks of ANSWER_CHUNK positions: [answer length, vocabulary] float32 logits at once would be 1.7 GB for a
    4k-token answer and a 103k vocabulary (each position's log-probability does not depend on the others')."""
    import paddle

    total = 0.0
    for start in range(0, len(answer_ids), ANSWER_CHUNK):
        chunk = list(answer_ids[start:start + ANSWER_CHUNK])
        logits = lm_logits(model, hidden[:, at + start:at + start + len(chunk), :]).astype("float32")[0]
        # log-softmax as logits - logsumexp: Paddle 3.3's CPU log_softmax kernel took 135 s for [444, 49152]
        logp = logits - paddle.logsumexp(logits, axis=-1, keepdim=True)
        picked = paddle.take_along_axis(logp, paddle.to_tensor(np.asarray(chunk, dtype="int64")[:, None]), 1)
        total += float(picked.sum())
    return total


ANSWER_CHUNK = 512
