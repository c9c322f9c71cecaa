"""A lean decode loop over the model's forward pass: continuous batching, in-place KV cache, per-prompt seeds.

Why not `model.generate`: on a CPU, PaddleFormers' generate made batch 8 SLOWER per reply than batch 1 (0.45x,
issue 13). Where the time went, and what this module does instead:
- padding: a batch was left-padded to its longest prompt and ran until its longest reply ended. Here prompts are
  taken longest first (deterministic order), a finished reply leaves the batch at once and a waiting prompt takes
  its slot (prefilled on its own, so no prompt is padded to another's length), and leading columns no row needs
  are dropped when the batch is rebuilt;
- the KV cache grew by concatenation, copying the whole cache at every step of every layer; here K/V live in
  buffers that grow in chunks and each step writes one column in place (`SlotCache`);
- attention expanded K/V to every query head (`repeat_kv` copies the cache once per query head per step); here
  query heads are grouped per KV head instead (`grouped_attention`, same numbers, no copy);
- the LM head ran over every prompt position in prefill (a 1000-token prompt: 1000 x vocab logits); here it runs on
  the last position only;
- Paddle uses one CPU thread unless told otherwise; `load_model` sets all cores (engine.use_all_cpu_cores).
Sampling is the recipe's (top_p, temperature; no top_k), done in numpy per prompt with that prompt's own random
stream (`prompt_seed`), so a prompt's reply does not depend on which prompts share its batch. What can still
differ is the float arithmetic of a batch of another shape (tests/test_generate.py measures it).
"""
import hashlib

import numpy as np

CHUNK = 128  # KV buffer growth step (columns)
GROUPED = "ernie_dpo_grouped"  # name under which grouped_attention is registered with the engine


def prompt_seed(seed, prompt_id):
    """A prompt's own sampling seed: from infer.seed and the prompt's id, never from its position or batch."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{prompt_id}".encode()).digest()[:4], "big") & 0x7FFFFFFF


# ------------------------------------------------------------------------------------------------ sampling


def sample_token(logits, temperature, top_p, rng):
    """One token id from one row of logits: temperature, then nucleus (top_p) sampling; temperature 0 = greedy.

    Nucleus as in Hugging Face's TopPLogitsWarper: keep the most probable tokens while the probability of the tokens
    before each one is < top_p (at least one). Ties are ordered by token id so the result is deterministic.
    """
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    z -= z.max()
    p = np.exp(z)
    p /= p.sum()
    k = min(64, p.size)  # the nucleus is usually a handful of tokens: sort a candidate set, not the vocabulary
    cand = np.argpartition(-p, k - 1)[:k]
    order = cand[np.lexsort((cand, -p[cand]))]
    if p[order].sum() < top_p and k < p.size:
        order = np.lexsort((np.arange(p.size), -p))
    cum = np.cumsum(p[order])
    n = min(int(np.searchsorted(cum, top_p, side="left")) + 1, order.size)
    kept = cum[:n]
    return int(order[min(int(np.searchsorted(kept, rng.random() * kept[-1], side="right")), n - 1)])


# ------------------------------------------------------------------------------------------------ attention


def grouped_attention(module, query, key, value, attention_mask=None, dropout=0.0, scaling=None, **kwargs):
    """Eager attention without repeat_kv: query heads that share a KV head are stacked along the query axis.

    query [B, Hq, q, D], key/value [B, Hkv, T, D], mask [B, 1, q, >=T] (additive). Query head h reads KV head
    h // (Hq / Hkv), the convention of repeat_kv and of the engine's fused QKV layouts.
    """
    import paddle

    b, hq, q, d = query.shape
    hkv, t = key.shape[1], key.shape[2]
    rep = hq // hkv
    qg = query.reshape([b, hkv, rep * q, d])
    w = paddle.matmul(qg, key, transpose_y=True) * scaling
    if attention_mask is not None:
        m = attention_mask[:, :, :, :t]
    elif q > 1:
        # The engine passes no mask when no position is padded and the backend is not "eager" (flash kernels are
        # causal by themselves): query i sits at position t - q + i and sees keys up to there.
        allowed = np.tril(np.ones((q, t), dtype=bool), k=t - q)
        m = paddle.to_tensor(np.where(allowed, 0.0, np.finfo(np.float32).min).astype("float32"))
        m = m.astype(w.dtype).reshape([1, 1, q, t])
    else:
        m = None
    if m is not None:
        if q > 1 and rep > 1:
            m = m.tile([1, 1, rep, 1])
        w = w + m
    w = paddle.nn.functional.softmax(w, axis=-1, dtype="float32").astype(query.dtype)
    out = paddle.matmul(w, value).reshape([b, hq, q, d]).transpose([0, 2, 1, 3]).reshape([b, q, hq * d])
    return out, None


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
    return (n + CHUNK - 1) // CHUNK * CHUNK + CHUNK


class Batch:
    """The rows decoded together: their cache, attention mask (numpy, [B, capacity]) and per-row state."""

    def __init__(self, cache, mask, rows, positions, last):
        self.cache, self.mask, self.rows = cache, mask, rows
        self.positions = positions  # next position id of each row
        self.last = last  # last sampled token of each row

    def __len__(self):
        return len(self.rows)


def combine(parts, n_layers):
    """One Batch from several (rows kept from the running batch + newly prefilled ones): right-aligned at the
    longest filled length, leading columns no row uses dropped, room for CHUNK more columns."""
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
    for layer in range(n_layers):
        k0 = parts[0].cache.keys[layer]
        keys = paddle.zeros([b, k0.shape[1], cap, k0.shape[3]], dtype=k0.dtype)
        values = paddle.zeros([b, k0.shape[1], cap, k0.shape[3]], dtype=k0.dtype)
        row = 0
        for p, s, u in zip(parts, starts, used):
            n = len(p)
            keys[row:row + n, :, length - u:length] = p.cache.keys[layer][:, :, s:p.cache.length]
            values[row:row + n, :, length - u:length] = p.cache.values[layer][:, :, s:p.cache.length]
            row += n
        cache.keys[layer], cache.values[layer] = keys, values
    row = 0
    for p, s, u in zip(parts, starts, used):
        mask[row:row + len(p), length - u:length] = p.mask[:, s:p.cache.length]
        row += len(p)
    return Batch(cache, mask, [r for p in parts for r in p.rows], np.concatenate([p.positions for p in parts]),
                 np.concatenate([p.last for p in parts]))


def select(batch, keep):
    """The rows `keep` (indices) of a batch."""
    import paddle

    idx = paddle.to_tensor(np.asarray(keep, dtype="int64"))
    c = batch.cache
    c.keys = [paddle.index_select(k, idx, axis=0) for k in c.keys]
    c.values = [paddle.index_select(v, idx, axis=0) for v in c.values]
    return Batch(c, batch.mask[keep], [batch.rows[i] for i in keep], batch.positions[keep], batch.last[keep])


# ------------------------------------------------------------------------------------------------ the loop


class Row:
    """One prompt being answered."""

    def __init__(self, index, ids, seed):
        self.index, self.prompt_len = index, len(ids)
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.out = []


def _forward(model, ids, positions, mask, cache):
    """Hidden state of the last position -> logits [B, vocab] as float32 numpy."""
    import paddle

    out = model.model(input_ids=paddle.to_tensor(ids), position_ids=paddle.to_tensor(positions),
                      attention_mask=paddle.to_tensor(mask), past_key_values=cache, use_cache=True, return_dict=True)
    h = out.last_hidden_state[:, -1:, :]
    return model.lm_head(h)[:, -1, :].astype("float32").numpy()


def prefill(model, n_layers, items, pad_id):
    """Prefill prompts [(index, ids, seed), ...] together (left-padded to the longest). Returns (Batch, logits)."""
    t = max(len(ids) for _, ids, _ in items)
    ids = np.full((len(items), t), pad_id, dtype="int64")
    mask = np.zeros((len(items), t), dtype=bool)
    for r, (_, row_ids, _) in enumerate(items):
        ids[r, t - len(row_ids):] = row_ids
        mask[r, t - len(row_ids):] = True
    positions = np.maximum(mask.cumsum(axis=1) - 1, 0)
    cache = SlotCache(n_layers)
    logits = _forward(model, ids, positions, mask, cache)
    cache.length, cache.decoding = t, True
    full = np.zeros((len(items), cache.capacity), dtype=bool)
    full[:, :t] = mask
    rows = [Row(i, row_ids, seed) for i, row_ids, seed in items]
    return Batch(cache, full, rows, mask.sum(axis=1).astype("int64"), np.zeros(len(items), dtype="int64")), logits


def generate(model, prompts, seeds, stop_ids, max_new_tokens, temperature, top_p, batch_size, pad_id, max_len=None,
             on_done=None, prefill_batch=1):
    """Answer every prompt (lists of token ids). Calls on_done(index, new_ids, finish_reason) as each reply ends
    ("eos": a stop token, not included; "length": max_new_tokens or the model's context reached).

    Prompts are started longest first; at most batch_size are decoded together, a finished one is replaced at once
    by the next waiting prompt (prefilled `prefill_batch` at a time: 1 on a CPU, where prefill is compute-bound and
    padding is pure waste; more on a GPU). Returns {index: (new_ids, finish_reason)}.
    """
    import paddle

    n_layers = model.config.num_hidden_layers
    stop = set(stop_ids)
    waiting = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
    results = {}
    batch = None

    def finish(row, reason):
        results[row.index] = (row.out, reason)
        if on_done is not None:
            on_done(row.index, row.out, reason)

    def take(logits, rows):
        """Sample one token per row; return the rows still running (indices)."""
        keep = []
        for r, row in enumerate(rows):
            tok = sample_token(logits[r], temperature, top_p, row.rng)
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

    with paddle.no_grad():
        while waiting or (batch is not None and len(batch)):
            free = batch_size - (len(batch) if batch is not None else 0)
            if free > 0 and waiting:
                items = []
                for _ in range(min(free, len(waiting))):
                    i = waiting.pop(0)
                    items.append((i, prompts[i], seeds[i]))
                parts = [batch] if batch is not None else []
                for k in range(0, len(items), prefill_batch):
                    new, logits = prefill(model, n_layers, items[k:k + prefill_batch], pad_id)
                    keep = take(logits, new.rows)
                    if keep:
                        new = select(new, keep)
                        new.last = np.array([r.out[-1] for r in new.rows], dtype="int64")
                        parts.append(new)
                parts = [p for p in parts if len(p)]
                batch = combine(parts, n_layers) if parts else None
                continue
            # one decode step for every running row
            c = batch.cache
            if c.length >= c.capacity:  # out of room: rebuild with CHUNK more columns
                batch = combine([batch], n_layers)
                c = batch.cache
            batch.mask[:, c.length] = True
            logits = _forward(model, batch.last[:, None], batch.positions[:, None], batch.mask, c)
            c.length += 1
            batch.positions = batch.positions + 1
            keep = take(logits, batch.rows)
            if len(keep) < len(batch):
                batch = select(batch, keep) if keep else None
                if batch is not None and not waiting:
                    batch = combine([batch], n_layers)  # drop columns only the finished rows needed
            if batch is not None:
                batch.last = np.array([r.out[-1] for r in batch.rows], dtype="int64")
    return results
