"""Cheaper CPU versions of PaddleFormers layers, for training (engine process) and local inference alike.

Measured with Paddle's op profiler on a CPU (SmolLM2-135M, PaddlePaddle 3.3.1; docs/benchmarks.md):
- RMSNorm: the engine's unfused RMSNorm (the fused kernel is GPU-only) squares with `pow(2)`, whose CPU kernel took
  6.7 ms for a [1000, 576] tensor, 6x a multiply of the same size: here `x * x`, the same numbers.
- Rotary embedding: `rotate_half` is two slices, a negation and a concat (ERNIE's interleaved layout: two strided
  slices, a stack and a flatten). It is a fixed signed permutation of the last axis, so here it is one matmul with
  that permutation matrix, built by applying the model's own rotate_half to the identity: any layout, the same
  numbers (each output is one input times +-1). q and k arrive as transposed (strided) views and cos / sin are
  broadcast over the heads in every layer; Paddle's CPU multiply is slow on both (forward and gradient), so here
  q and k are made contiguous and cos / sin expanded to their shapes once per forward pass (every layer gets the same
  cos tensor). The smol profile's first 8 training steps: 87.4 -> 79.4 s (after the reference pass), the outputs and
  all 272 gradients of a SmolLM2 forward + backward equal bit for bit; a 500-token prompt's rotary without autograd
  6.2 ms -> 0.8 ms a layer.

- Attention: the engine's eager attention repeats K/V for every query head, rebuilds the DPO mask from its sparse
  form in every layer, adds it with a broadcast (slow in Paddle's CPU kernel) and attends over every key, masked or
  not: a SmolLM2 forward pass over 4 x 768 tokens took 20-25 s. decode.grouped_attention (the inference attention)
  does none of that -- grouped query heads, the mask made dense once per forward pass and expanded once, query
  blocks that skip the keys after them -- with the same numbers; it replaces "eager" in this process.

Without autograd only (install(inference=True): local inference and the dev server, never the training engine;
the rotary slices wherever no gradient is recorded), measured on real prompts (SmolLM2, 2 cores, docs/benchmarks.md):
- RMSNorm: Paddle's fused_rms_norm has a CPU forward kernel: 0.48 ms instead of 4.6 ms for [1701, 576], 9 us
  instead of 64 us for a decode step (results equal to 4e-6). Its backward is not used (training keeps x * x).
- Rotary embedding: rotate_half is the module's own slices (faster than the matmul without autograd).

install() patches the classes in this process; call it before the model runs (on a CPU only: on a GPU the fused
kernels are used). tests/test_engine.py checks that a 10-step DPO run gives the engine's own losses.
"""
import paddle


def rms_norm_forward(self, hidden_states):
    """paddleformers.nn.norm.RMSNorm.forward, unfused path, with x * x for pow(2)."""
    if self.config.get("fuse_rms_norm", True):
        return _original["rms_norm"](self, hidden_states)
    if _inference and not paddle.is_grad_enabled() and hidden_states.dtype == paddle.float32:
        from paddle.incubate.nn.functional import fused_rms_norm

        out = fused_rms_norm(hidden_states, self.weight, None, self.variance_epsilon, hidden_states.ndim - 1)
        return out[0] if isinstance(out, (tuple, list)) else out
    with paddle.amp.auto_cast(False):
        x = hidden_states if hidden_states.dtype == paddle.float32 else hidden_states.astype("float32")
        variance = (x * x).mean(-1, keepdim=True)
        hidden_states = paddle.rsqrt(variance + self.variance_epsilon) * hidden_states
    if self.weight.dtype in [paddle.float16, paddle.bfloat16]:
        hidden_states = paddle.cast(hidden_states, self.weight.dtype)
    return hidden_states * self.weight


def matmul_rotate_half(original):
    """A modeling module's rotate_half(x), computed as x @ rotate_half(I): one matmul instead of slices + concat."""
    matrices = {}

    def rotate_half(x):
        key = (x.shape[-1], x.dtype)
        if key not in matrices:
            matrices[key] = original(paddle.eye(x.shape[-1], dtype=x.dtype))
        return paddle.matmul(x, matrices[key])

    return rotate_half


def expanded_rotary(module, slices_rotate_half):
    """module.apply_rotary_pos_emb with q and k made contiguous (the engine passes transposed views) and cos / sin
    expanded to their shapes once per forward pass, instead of a strided multiply broadcast over the heads in every
    layer. The same arithmetic, element for element: q * cos + rotate_half(q) * sin in float32. rotate_half: the
    module's own slices without autograd (faster there), its matmul form (matmul_rotate_half) while training."""
    original = module.apply_rotary_pos_emb
    interleaved = "ernie" in module.__name__  # ERNIE 4.5 pairs dims (0,1), (2,3), ...: cos repeated per pair
    expanded = {}

    def apply_rotary_pos_emb(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
        if unsqueeze_dim != 1 or q.dtype != paddle.float32 or not (cos.stop_gradient and sin.stop_gradient):
            return original(q, k, cos, sin, position_ids, unsqueeze_dim)
        if expanded.get("cos") is not cos:  # a new forward pass (held here, so `is` cannot match a reused id)
            expanded.clear()
            expanded["cos"] = cos
        rotate_half = module.rotate_half if paddle.is_grad_enabled() else slices_rotate_half
        out = []
        for x in (q, k):
            x = x if x.is_contiguous() else x.contiguous()
            shape = tuple(x.shape)
            if shape not in expanded:
                c, s = cos.unsqueeze(1), sin.unsqueeze(1)
                if interleaved:
                    c = c[..., : c.shape[-1] // 2].repeat_interleave(2, axis=-1)
                    s = s[..., : s.shape[-1] // 2].repeat_interleave(2, axis=-1)
                reps = [1, shape[1], 1, 1]
                expanded[shape] = (c.astype("float32").tile(reps), s.astype("float32").tile(reps))
            c, s = expanded[shape]
            out.append(x * c + rotate_half(x) * s)
        return out[0], out[1]

    return apply_rotary_pos_emb


_original = {}
_inference = False


def install(inference=False):
    """Patch RMSNorm, eager attention and the rotary embedding of the Llama and ERNIE 4.5 modeling code, once per
    process; inference=True adds the inference-only paths (a process that decodes and never trains)."""
    global _inference
    if inference and not _inference:
        install()
        _inference = True  # read by rms_norm_forward
        return
    if _original:
        return
    from paddleformers.nn import norm
    from paddleformers.nn.attention.interface import AttentionInterface
    from paddleformers.transformers.ernie4_5 import modeling as ernie
    from paddleformers.transformers.llama import modeling as llama

    from .decode import grouped_attention

    _original["rms_norm"] = norm.RMSNorm.forward
    norm.RMSNorm.forward = rms_norm_forward
    _original["eager"] = AttentionInterface._global_mapping["eager"]
    AttentionInterface._global_mapping["eager"] = grouped_attention
    for module in (llama, ernie):  # apply_rotary_pos_emb looks rotate_half up in its module at each call
        _original[module.__name__] = module.rotate_half
        module.rotate_half = matmul_rotate_half(module.rotate_half)
        _original[module.__name__ + ".apply_rotary_pos_emb"] = module.apply_rotary_pos_emb
        module.apply_rotary_pos_emb = expanded_rotary(module, _original[module.__name__])
