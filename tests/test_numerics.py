"""Row invariance, op by op and for whole forwards, on this machine's chosen kernels.

A row's result must be bitwise the same whether the forward has 1, 2, 3, 8, 17 or 64 rows, wherever the
row sits among them, and whatever the other rows are: that is what makes a verification forward, a token
tree and a one-token step give the target the same logits (lossless to the last bit), and what will make
a request's text independent of the requests batched with it. Each op is checked against the same row
computed alone; the shapes are those of the packaged models (SmolLM2, the Qwen pair) in the configs'
default dtype, bfloat16, and in float32.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_hf_model

from services.engine import kernels
from services.engine.attention import RowLayout, Rows, attend
from services.engine.kernels import (
    FP16,
    INT4,
    INT4_GROUP,
    MAX_ROWS,
    ChosenLinear,
    KernelChoice,
    KernelChoices,
    candidates,
    dequantize_int4,
    dequantize_int8,
    fp16_scale,
    kernel_choices,
    probe,
    quantize_int4,
    quantize_int8,
    weight_allowed,
)
from services.engine.model import Decoder, RMSNorm, _rotate_half
from services.engine.tree import TokenTree

ROW_COUNTS = (1, 2, 3, 8, 17, 64)
DTYPES = (torch.bfloat16, torch.float32, torch.int8, INT4)  # int8, int4: weight-only (per output row, per group)
CPU = torch.device("cpu")
# [out, in] of the packaged models' matmuls: SmolLM2-135M (qkv, o, gate+up, down, LM head), Qwen2.5-Coder 1.5B
# (qkv, gate+up, down)
SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536), (49152, 576), (2048, 1536), (17920, 1536), (1536, 8960)]


def rows_match_alone(op, x: torch.Tensor) -> None:
    """op over n rows at several places in x, and with the other rows replaced, equals op row by row."""
    alone = torch.cat([op(x[i : i + 1]) for i in range(len(x))])
    for n in ROW_COUNTS:
        for offset in {0, len(x) - n, (len(x) - n) // 2}:
            assert torch.equal(op(x[offset : offset + n]), alone[offset : offset + n]), (n, offset)
    other = torch.randn_like(x)
    other[5] = x[5]
    assert torch.equal(op(other)[5], alone[5])


@pytest.fixture(autouse=True)
def two_threads():
    torch.set_num_threads(2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_linear_layers_and_lm_head(shape, dtype):
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 0.05
    linear = ChosenLinear(weight, torch.randn(shape[0]), dtype, CPU, kernel_choices().linear(weight, dtype, CPU))
    rows_match_alone(linear, probe(MAX_ROWS, shape[1], generator=torch.Generator().manual_seed(1)) * 2)


def test_int8_weights_are_quantised_per_output_row_within_half_a_step():
    weight = torch.randn(8, 64, generator=torch.Generator().manual_seed(0)) * torch.arange(1, 9)[:, None]
    weight[3] = 0
    q, scales = quantize_int8(weight)
    assert q.dtype == torch.int8 and scales.dtype == torch.bfloat16 and scales[3] == 1 and q.abs().max() <= 127
    error = (q.float() * scales.float()[:, None] - weight).abs()
    assert (error <= 0.51 * scales.float()[:, None]).all()


def test_int4_weights_are_quantised_per_group_within_half_a_step():
    weight = torch.randn(8, 4 * INT4_GROUP, generator=torch.Generator().manual_seed(0)) * torch.arange(1, 9)[:, None]
    weight[3, :INT4_GROUP] = -0.30078125  # constant groups: served as their bfloat16 value
    weight[5, INT4_GROUP : 2 * INT4_GROUP] = 0.01
    q, scales, zeros = quantize_int4(weight)
    assert q.min() >= 0 and q.max() <= 15 and scales.dtype == zeros.dtype == torch.bfloat16
    assert scales[3, 0] == 1 and (dequantize_int4(weight)[3, :INT4_GROUP] == -0.30078125).all()
    assert (dequantize_int4(weight)[5, INT4_GROUP : 2 * INT4_GROUP] == torch.tensor(0.01).bfloat16().float()).all()
    step = scales.float().repeat_interleave(INT4_GROUP, dim=1)
    assert ((dequantize_int4(weight) - weight).abs() <= 0.51 * step + 1e-2 * weight.abs()).all()
    with pytest.raises(ValueError, match="partial group"):
        quantize_int4(torch.randn(4, INT4_GROUP + 8))


@pytest.mark.parametrize("dtype, dequantize", [(torch.int8, dequantize_int8), (INT4, dequantize_int4)], ids=str)
def test_every_quantised_kernel_computes_the_served_weight(dtype, dequantize):
    """Each candidate (torch's low-bit GEMM, or a float32 kernel over the dequantised weight) multiplies by the
    same W': within bfloat16's rounding of the activations and outputs of the native GEMM."""
    generator = torch.Generator().manual_seed(0)
    weight = (torch.randn(256, 512, generator=generator) * 0.05).bfloat16()  # quantised from bfloat16 values
    x = torch.randn(5, 512, generator=generator)
    expected = x.bfloat16().float() @ dequantize(weight).T
    for name, (prepare, run) in candidates(dtype, CPU).items():
        got = run(prepare(weight), x)
        assert torch.allclose(got, expected, rtol=2e-2, atol=2e-2 * expected.abs().max()), name


@pytest.mark.skipif(FP16 not in candidates(torch.bfloat16, CPU), reason="fbgemm's FP16 GEMM is an x86 kernel")
def test_the_float16_weights_kernel_multiplies_by_the_bfloat16_values_themselves():
    """It holds a bfloat16 weight in float16 after a power-of-two scale: every value exactly (magnitudes spread over
    2^-12..2^19 here, 31 binades: float16 overflows unscaled), products and sums in float32 like the float32
    kernels."""
    generator = torch.Generator().manual_seed(0)
    exponents = torch.randint(-12, 19, (96, 256), generator=generator).float()
    signs = torch.randint(0, 2, (96, 256), generator=generator).float() * 2 - 1
    weight = (signs * (1 + torch.rand(96, 256, generator=generator)) * torch.exp2(exponents)).bfloat16()
    prepare, run = candidates(torch.bfloat16, CPU)[FP16]
    packed, unscale = prepare(weight)
    held = torch.ops.quantized.linear_unpack_fp16(packed)[0]
    assert torch.equal(held * unscale, weight.float())  # exactly the model's values
    x = torch.randn(5, 256, generator=generator)
    expected = (x.double() @ weight.double().T)
    tolerance = 256 * 2 ** -23 * (x.double().abs() @ weight.double().abs().T)  # float32 sums of 256 products
    assert ((run((packed, unscale), x).double() - expected).abs() <= tolerance).all()


def test_float16_holds_a_weight_only_when_every_value_survives():
    """The scale puts the largest value under float16's largest; a value whose last bits fall below float16's
    smallest subnormal after that, or that float16's range cannot reach at all, refuses the weight."""
    tiny = 2.0 ** -24
    assert fp16_scale(torch.tensor([[40000.0, tiny, 1.0, 3 * tiny]], dtype=torch.float16)) is None
    assert fp16_scale(torch.tensor([[2.0 ** 100, 2.0 ** -60, 2.0 ** 90]], dtype=torch.bfloat16)) is None
    assert fp16_scale(torch.tensor([[float("inf"), 1.0]], dtype=torch.bfloat16)) is None
    held = torch.tensor([[2.0 ** 20, 3 * 2.0 ** -10, -(2.0 ** -11)]], dtype=torch.bfloat16)
    assert fp16_scale(held) == 2.0 ** -6 and fp16_scale(torch.zeros(2, 3, dtype=torch.bfloat16)) == 1.0


@pytest.mark.skipif(FP16 not in candidates(torch.bfloat16, CPU), reason="fbgemm's FP16 GEMM is an x86 kernel")
def test_a_weight_float16_cannot_hold_gets_a_choice_of_its_own(tmp_path, monkeypatch):
    """Weights of one shape share a choice only if float16 holds all of them or none: one with a value 2^50 below
    its largest never gets the float16 kernel, whichever weight was measured first, and computes exactly."""
    def measure(weight, dtype, device, float_output=False):  # as if the float16 kernel were fastest
        return KernelChoice(FP16 if weight_allowed(FP16, weight.to(dtype)) else "linear-f32", 3, {})
    monkeypatch.setattr(kernels, "measure", measure)
    choices = KernelChoices(tmp_path / "choices.json")
    weight = torch.randn(64, 576, generator=torch.Generator().manual_seed(0)).bfloat16()
    inexact = weight.clone()
    inexact[0, 0] = 2.0 ** -50
    assert fp16_scale(weight) is not None and fp16_scale(inexact) is None
    assert choices.linear(weight, torch.bfloat16, CPU).kernel == FP16
    choice = choices.linear(inexact, torch.bfloat16, CPU)
    assert choice.kernel != FP16
    linear = ChosenLinear(inexact, None, torch.bfloat16, CPU, choice)
    x = torch.randn(3, 576)
    assert torch.allclose(linear(x), x @ inexact.float().T, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("hidden", [64, 128, 576, 896, 1536])  # 64, 128: Qwen3's q/k norms over a head
def test_rms_norm(hidden):
    norm = RMSNorm(torch.rand(hidden) + 0.5, 1e-5)
    rows_match_alone(norm, torch.randn(MAX_ROWS, hidden) * 3)


def test_rotary_embedding_and_silu():
    cos, sin = torch.rand(MAX_ROWS, 64), torch.rand(MAX_ROWS, 64)
    x = torch.randn(MAX_ROWS, 9, 64)
    rotated = x * cos[:, None] + _rotate_half(x) * sin[:, None]
    for i in range(MAX_ROWS):
        assert torch.equal(x[i : i + 1] * cos[i : i + 1, None] + _rotate_half(x[i : i + 1]) * sin[i : i + 1, None],
                           rotated[i : i + 1])
    for width in (1536, 1000):  # 1000: not a multiple of the vector block, where torch's own silu varies
        rows_match_alone(lambda g: g / (1.0 + torch.exp(-g)), torch.randn(MAX_ROWS, width) * 4)


def _attention_case(heads: int, kv_heads: int, head_dim: int, committed: int, n: int, parents=None):
    """(output of the forward's n rows, each row computed alone) for one layer's attention."""
    generator = torch.Generator().manual_seed(committed + n)
    quantum = kernel_choices().attention_quantum(head_dim, kv_heads, heads // kv_heads, CPU)
    cache = torch.randn(2, kv_heads, committed + MAX_ROWS + 64, head_dim, generator=generator)
    q = torch.randn(n, heads, head_dim, generator=generator)
    out = attend(q, [cache], Rows.of([RowLayout.build(committed, parents, n, CPU)]), quantum)
    layout = RowLayout.build(committed, parents, n, CPU)
    alone = []
    for r in range(n):
        # row r alone: its ancestors' keys moved to the slots they would hold in a linear continuation
        path = [r]
        while parents is not None and parents[path[-1]] >= 0:
            path.append(parents[path[-1]])
        if parents is None:
            path = list(range(r, -1, -1))
        solo = cache.clone()
        for depth, row in enumerate(reversed(path)):
            solo[:, :, committed + depth] = cache[:, :, committed + row]
        position = int(layout.positions[r])
        single = RowLayout.build(position, None, 1, CPU)
        alone.append(attend(q[r : r + 1], [solo], Rows.of([single]), quantum))
    return out, torch.cat(alone)


@pytest.mark.parametrize("committed", [0, 5, 63, 130, 700])
@pytest.mark.parametrize("n", ROW_COUNTS)
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (12, 2, 128), (14, 2, 64)],
                         ids=["smollm2", "qwen-1.5b", "qwen-0.5b"])
def test_attention_with_and_without_cache(heads, kv_heads, head_dim, committed, n):
    out, alone = _attention_case(heads, kv_heads, head_dim, committed, n)
    assert torch.equal(out, alone)


@pytest.mark.parametrize("committed", [3, 100, 190])
def test_attention_with_a_tree_mask(committed):
    tree = TokenTree()
    for path in ([5, 6, 7, 8], [5, 9], [4, 6, 1], [4, 6, 2, 3, 3]):
        tree.add_path(path, "context", 32)
    parents = [-1] + [0 if p < 0 else 1 + p for p in tree.parents]  # row 0: the last committed token
    out, alone = _attention_case(9, 3, 64, committed, len(parents), parents)
    assert torch.equal(out, alone)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "yarn"])
def test_whole_forward_prefill_steps_chunks_and_trees_agree(arch, dtype):
    decoder = Decoder.from_hf(tiny_hf_model(7, arch, vocab=16, init_range=0.1), dtype, CPU)
    tokens = torch.randint(0, 16, (260,), generator=torch.Generator().manual_seed(0))
    prefill = decoder(tokens, decoder.new_cache(), len(tokens))
    cache = decoder.new_cache()
    steps = torch.cat([decoder(tokens[i : i + 1], cache, 1) for i in range(len(tokens))])
    cache, pieces, i = decoder.new_cache(), [], 0
    for size in (5, 1, 3, 17, 2, 64, 1, 8, 33, 126):
        pieces.append(decoder(tokens[i : i + size], cache, size))
        i += size
    assert torch.equal(prefill, steps) and torch.equal(torch.cat(pieces), steps)

    tree = TokenTree()
    for path in ([3, 1, 4], [3, 2], [9, 9, 9, 1]):
        tree.add_path(path, "context", 32)
    cache = decoder.new_cache()
    decoder(tokens[:199], cache, 1)
    parents = [-1] + [0 if p < 0 else 1 + p for p in tree.parents]
    tree_logits = decoder(torch.tensor([int(tokens[199])] + tree.tokens), cache, len(tree) + 1, parents)
    for node in range(len(tree)):
        path = [tree.tokens[i] for i in tree.path_to(node)]
        cache = decoder.new_cache()
        decoder(tokens[:200], cache, 1)
        assert torch.equal(decoder(torch.tensor(path), cache, len(path))[-1], tree_logits[1 + node])


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (12, 2, 128)], ids=["smollm2", "qwen-1.5b"])
def test_attention_over_several_requests_equals_each_alone(heads, kv_heads, head_dim):
    """A batched forward: rows of requests with their own caches, lengths and trees in one attention call."""
    generator = torch.Generator().manual_seed(3)
    quantum = kernel_choices().attention_quantum(head_dim, kv_heads, heads // kv_heads, CPU)
    cases = [(5, 3, None), (300, 1, None), (140, 13, [-1, 0, 0, 1, 2, 2, 3, 4, 5, 6, 6, 7, 8]), (700, 64, None),
             (64, 17, None)]
    caches, layouts, queries, alone = [], [], [], []
    for committed, n, parents in cases:
        caches.append(torch.randn(2, kv_heads, committed + MAX_ROWS + 64, head_dim, generator=generator))
        layouts.append(RowLayout.build(committed, parents, n, CPU))
        queries.append(torch.randn(n, heads, head_dim, generator=generator))
        alone.append(attend(queries[-1], caches[-1:], Rows.of(layouts[-1:]), quantum))
    assert torch.equal(attend(torch.cat(queries), caches, Rows.of(layouts), quantum), torch.cat(alone))
