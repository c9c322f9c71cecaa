"""Cheaper CPU versions of PaddleFormers layers, for training (engine process) and local inference alike.

Measured with Paddle's op profiler on a CPU (SmolLM2-135M, PaddlePaddle 3.3.1; docs/benchmarks.md):
- RMSNorm: the engine's unfused RMSNorm (the fused kernel is GPU-only) squares with `pow(2)`, whose CPU kernel took
  6.7 ms for a [1000, 576] tensor, 6x a multiply of the same size: here `x * x`, the same numbers.
- Rotary embedding: `rotate_half` is two slices, a negation and a concat (ERNIE's interleaved layout: two strided
  slices, a stack and a flatten). It is a fixed signed permutation of the last axis, so here it is one matmul with
  that permutation matrix, built by applying the model's own rotate_half to the identity: any layout, the same
  numbers (each output is one input times +-1).

- Attention: the engine's eager attention repeats K/V for every query head, rebuilds the DPO mask from its sparse
  form in every layer, adds it with a broadcast (slow in Paddle's CPU kernel) and attends over every key, masked or
  not: a SmolLM2 forward pass over 4 x 768 tokens took 20-25 s. decode.grouped_attention (the inference attention)
  does none of that -- grouped query heads, the mask made dense once per forward pass and expanded once, query
  blocks that skip the keys after them -- with the same numbers; it replaces "eager" in this process.

install() patches the classes in this process; call it before the model runs (on a CPU only: on a GPU the fused
kernels are used). tests/test_engine.py checks that a 10-step DPO run gives the engine's own losses.
"""
import paddle


def rms_norm_forward(self, hidden_states):
    """paddleformers.nn.norm.RMSNorm.forward, unfused path, with x * x for pow(2)."""
    if self.config.get("fuse_rms_norm", True):
        return _original["rms_norm"](self, hidden_states)
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


_original = {}


def install():
    """Patch RMSNorm, eager attention and the rotary embedding of the Llama and ERNIE 4.5 modeling code, once per
    process."""
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
