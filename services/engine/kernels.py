"""Matmul kernels chosen by measurement, and the row invariance each must have.

Why measure: decoding multiplies 1 to 64 rows by every weight, and which
kernel does that fastest depends on the CPU. A layout hard-coded for one
machine (bfloat16 `x @ W^T` over a transposed copy) ran 21x slower than
`F.linear` on another; MKL's float32 GEMM is far slower than oneDNN's on AMD
CPUs. So for each weight shape of a model, every candidate kernel is timed on
this machine and the fastest row-invariant one is used for every forward.

Why row invariance: a verification forward computes a position together with
other rows, plain decoding computes it alone. If a kernel's result for a row
depends on how many rows share the call (libraries switch code paths for small
row counts: a GEMV for one row, other tile kernels for two or three), the
target's logits differ in the last bits and an argmax can flip: the output
would no longer be plain decoding's. A candidate is invariant when every row
of a call with 1..MAX_ROWS rows, at different places among them, is bitwise
equal to that row computed alone, with every thread count a forward may use.
Some kernels are invariant only once the row count is a multiple of a small
`quantum` (MKL float32: 4, measured on an AVX-512 EPYC; half-precision outputs
at least 4, see `smallest_quantum`): calls are then padded with zero rows up
to that multiple, which costs little where a forward reads weights from memory
anyway.

Choices are cached per CPU signature (model name, family, flags), torch
version, dtype and shape. Every process on a machine must use the same kernel
for a model, or a Serve replica and `hierspec generate` would compute different
logits: the first process to measure writes the choice under a file lock, and
every later one reads it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from services.engine.model_store import cache_dir, exclusive

log = logging.getLogger("hierspec.kernels")

MAX_ROWS = 64  # rows of one forward; longer inputs (a prompt) are computed in chunks of this many
TAIL_KEYS = 2 * MAX_ROWS  # keys of a row's attention tail (see services.engine.attention)
QUANTA = (1, 2, 3, 4, 6, 8)  # row-count multiples tried, smallest first (fbgemm FP16 on AVX2: 3)
TIMED_ROWS = (1, 4, 16)  # one-token steps, short drafts, trees and long drafts: what decoding runs
# 7: timings interleaved, fastest round (6 kept choices timed under load); 8: the float16-weights kernel
CHOICE_VERSION = 8


def _cpuinfo() -> dict[str, str]:
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "cpu family", "model", "stepping", "flags") and key not in fields:
                fields[key] = value.strip()
    except OSError:
        pass
    return fields


def cpu_signature() -> str:
    """What decides which kernels exist and how fast they are: CPU model, family/model/stepping, flags.
    (The model name alone is ambiguous: "AMD EPYC" covers machines with and without AVX-512.)"""
    fields = _cpuinfo()
    name = fields.get("model name") or platform.processor() or platform.machine()
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]
    return f"{name} [{digest}]"


def machine() -> dict:
    """The facts a benchmark reports: CPU model, the vector and matrix extensions that decide kernel
    speed, torch's version and threads."""
    fields = _cpuinfo()
    flags = set(fields.get("flags", "").split())
    return {"processor": fields.get("model name") or platform.processor(), "cpu_signature": cpu_signature(),
            "isa": [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16") if f in flags],
            "platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()}


def _onednn_available() -> bool:
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(2, 2), 1)
        return True
    except (RuntimeError, AttributeError):
        return False


# --- candidate kernels ----------------------------------------------------------------------------
# Each takes the weight W [out, in] (values already rounded to the model's dtype) and returns the
# prepared weight and a function (prepared, x float32 [rows, in]) -> float32 [rows, out].

def _linear_in(dtype: torch.dtype):
    def prepare(weight: torch.Tensor):
        return weight.to(dtype).contiguous()

    def run(w, x):
        return F.linear(x.to(dtype), w).float()
    return prepare, run


def _transposed_in(dtype: torch.dtype):
    def prepare(weight: torch.Tensor):
        return weight.to(dtype).t().contiguous()

    def run(w, x):
        return (x.to(dtype) @ w).float()
    return prepare, run


def _onednn_f32():
    def prepare(weight: torch.Tensor):
        return torch.ops.mkldnn._reorder_linear_weight(weight.float(), 8)

    def run(w, x):
        return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
    return prepare, run


# Half-precision weights, float32 arithmetic (fbgemm's FP16 GEMM, on x86 CPUs): it holds the weight in float16
# and multiplies float32 activations by it in float32, so a bfloat16 model's weight read from memory takes half
# the bytes of a float32 kernel's (on CPUs without native bfloat16 every other kernel of a bfloat16 model computes
# in float32 from float32 weights) and its logits stay float32 (the LM head). It serves only weights float16
# holds exactly, every value, once multiplied by a power of two (`fp16_scale`; the output is multiplied back, a
# deterministic elementwise step, so row invariance is unchanged): bfloat16's 8-bit significands fit float16's 11,
# so that is every weight whose values span fewer than about 32 binades from the largest to the last bit of the
# smallest; another weight is measured without this kernel (`weight_allowed`). On a 2-core AVX2 EPYC, padded to 3
# rows: a 1536 x 8960 projection at 1 / 16 rows 0.98 / 3.53 ms against 2.56 / 4.71 for oneDNN float32.
FP16_CHECK_ELEMENTS = 1 << 22  # `fp16_scale` checks a weight in blocks of rows this size: float32 copies stay small


def fp16_scale(weight: torch.Tensor) -> float | None:
    """The power of two that puts every value of `weight` into float16 exactly, its largest in [2^14, 2^15); None
    where no such scale exists (values spanning too many binades, or not finite). Checked by the round trip in
    float32: scaled, rounded to float16, scaled back, every value must be the one it was."""
    largest = weight.abs().max().item() if weight.numel() else 0.0
    if not math.isfinite(largest):
        return None
    exponent = 14 - math.floor(math.log2(largest)) if largest > 0 else 0
    if abs(exponent) > 100:  # the scale and its inverse must be normal float32 values
        return None
    scale = 2.0 ** exponent
    rows = max(1, FP16_CHECK_ELEMENTS // max(1, weight.shape[-1]))
    for block in weight.split(rows):
        values = block.float()
        if not torch.equal((values * scale).half().float() * (1.0 / scale), values):
            return None
    return scale


def _fbgemm_fp16_available() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines and \
        hasattr(torch.ops.quantized, "linear_dynamic_fp16")


def _fbgemm_fp16():
    def prepare(weight: torch.Tensor):
        scale = fp16_scale(weight)
        if scale is None:
            raise ValueError(f"a {tuple(weight.shape)} weight has values float16 cannot hold at any scale")
        engine = torch.backends.quantized.engine
        torch.backends.quantized.engine = "fbgemm"  # prepacking is the fbgemm engine's (running is any engine's)
        try:
            return torch.ops.quantized.linear_prepack_fp16(weight.float().mul_(scale), None), 1.0 / scale
        finally:
            torch.backends.quantized.engine = engine

    def run(w, x):
        packed, unscale = w
        return torch.ops.quantized.linear_dynamic_fp16(x.contiguous(), packed) * unscale
    return prepare, run


# Weight-only quantisation: the served model is W', the weight quantised once from its bfloat16 values; kernels
# differ in how they compute x W'^T: torch's own low-bit GEMM with bfloat16 activations, or W' dequantised once
# to float32 and any float32 kernel.
# - int8 (`dtype: int8`): each output row of W becomes int8 values q and a bfloat16 scale s (symmetric,
#   s = max |W_row| / 127), W' = q s.
# - int4 (`dtype: int4`, tagged torch.uint4): each group of INT4_GROUP consecutive inputs of an output row becomes
#   4-bit values q in 0..15, a bfloat16 scale s and offset z (asymmetric, as llama.cpp's Q4_1),
#   W' = (q - 8) s + z, the layout of torch's int4 GEMM (CPU only: on another device `dtype: int4` is refused),
#   which reads half int8's bytes (a dequantised kernel, where one measures faster, holds float32 weights).
FP16 = "fbgemm-fp16-f32"  # the float16-weights kernel (above)
INT4 = torch.uint4
INT4_GROUP = 32
QUANTISED = (torch.int8, INT4)


def values_dtype(dtype: torch.dtype) -> torch.dtype:
    """What a weight's values are rounded to before a kernel prepares it: bfloat16 for int8 and int4 (quantised
    from there, and what the embeddings, norms, biases and LM head of such a model keep), else the dtype itself."""
    return torch.bfloat16 if dtype in QUANTISED else dtype


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [out, in], s bfloat16 [out]) with q * s the served weight; an all-zero row gets scale 1."""
    w = weight.float()
    scales = (w.abs().amax(dim=1) / 127).to(torch.bfloat16)
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    return torch.round(w / scales.float()[:, None]).clamp(-127, 127).to(torch.int8), scales


def dequantize_int8(weight: torch.Tensor) -> torch.Tensor:
    q, scales = quantize_int8(weight)
    return q.float() * scales.float()[:, None]


def quantize_int4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q int32 [out, in] in 0..15, s and z bfloat16 [out, in / INT4_GROUP]) with (q - 8) s + z the served
    weight; a constant group gets scale 1 and its value, rounded to bfloat16, as z (q = 8)."""
    out_features, in_features = weight.shape
    if in_features % INT4_GROUP:
        raise ValueError(f"int4 quantises groups of {INT4_GROUP} inputs; a weight with {in_features} inputs has "
                         "a partial group: serve this model in int8 or bfloat16")
    w = weight.float().reshape(out_features, in_features // INT4_GROUP, INT4_GROUP)
    low, high = w.amin(dim=2), w.amax(dim=2)
    scales = ((high - low) / 15).to(torch.bfloat16)
    constant = scales == 0
    scales = torch.where(constant, torch.ones_like(scales), scales)
    zeros = torch.where(constant, low, low + 8 * scales.float()).to(torch.bfloat16)
    q = torch.round((w - zeros.float()[..., None]) / scales.float()[..., None] + 8).clamp(0, 15)
    return q.to(torch.int32).reshape(out_features, in_features), scales, zeros


def dequantize_int4(weight: torch.Tensor) -> torch.Tensor:
    q, scales, zeros = quantize_int4(weight)
    groups = q.reshape(q.shape[0], -1, INT4_GROUP).float() - 8
    return (groups * scales.float()[..., None] + zeros.float()[..., None]).reshape(q.shape)


def _int8_bf16():
    def run(w, x):
        q, scales = w
        return torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16).contiguous(), q, scales).float()
    return quantize_int8, run


def _int4_bf16():
    def prepare(weight: torch.Tensor):
        q, scales, zeros = quantize_int4(weight)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        return packed, torch.stack([scales.T, zeros.T], dim=-1).contiguous()

    def run(w, x):
        packed, scales_and_zeros = w
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16).contiguous(), packed, INT4_GROUP,
                                                          scales_and_zeros).float()
    return prepare, run


def _dequantized(dequantize, kernel):
    """A float32 kernel over a quantised model's weights, dequantised once."""
    prepare, run = kernel
    return lambda weight: prepare(dequantize(weight)), run


def candidates(dtype: torch.dtype, device: torch.device) -> dict[str, tuple[Callable, Callable]]:
    """Kernel name -> (prepare, run). The weights' values are the model's dtype in every candidate;
    a kernel computing in float32 multiplies float32 activations by those values (more precise, and
    the faster one on CPUs without native bfloat16)."""
    if dtype == INT4 and device.type != "cpu":
        raise ValueError(f"dtype int4 computes with torch's int4 GEMM for CPUs, which {device} lacks: serve int8 "
                         "or bfloat16 there")
    if dtype in QUANTISED:
        short, native, dequantize = {torch.int8: ("int8", _int8_bf16, dequantize_int8),
                                     INT4: ("int4", _int4_bf16, dequantize_int4)}[dtype]
        found = {f"{short}-bf16": native(),
                 f"{short}-dequantized-linear-f32": _dequantized(dequantize, _linear_in(torch.float32))}
        if device.type == "cpu" and _onednn_available():
            found[f"{short}-dequantized-onednn-f32"] = _dequantized(dequantize, _onednn_f32())
        return found
    short = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}[dtype]
    found = {f"linear-{short}": _linear_in(dtype)}
    if device.type != "cpu":
        return found  # cuBLAS: one candidate, not measured (its row invariance is not checked either)
    found[f"transposed-{short}"] = _transposed_in(dtype)
    if dtype != torch.float32:
        found["linear-f32"] = _linear_in(torch.float32)
    if _onednn_available():
        found["onednn-f32"] = _onednn_f32()
    if dtype in (torch.bfloat16, torch.float16) and _fbgemm_fp16_available():
        found[FP16] = _fbgemm_fp16()
    return found


HALF_OUTPUT_MIN_ELEMENTS = 1 << 16


def half_output_allowed(kernel: str, weight: torch.Tensor) -> bool:
    """A kernel with a half-precision output rounds away most of what another code path would change, so a
    check on test inputs cannot see a path switch (on a tiny weight it saw none of the rare flips that real
    activations showed: torch sends products under 16^3 multiply-adds to its own loop, larger ones to
    oneDNN). Such kernels serve only weights large enough that every call takes the many-row library path,
    and pad to at least 4 rows (see `smallest_quantum`); float32 outputs show any change and are checked."""
    return kernel.endswith("-f32") or weight.numel() >= HALF_OUTPUT_MIN_ELEMENTS


def weight_allowed(kernel: str, weight: torch.Tensor) -> bool:
    """torch's int4 GEMM packs output rows in blocks of 16; a weight with a partial block takes another kernel.
    The float16-weights kernel serves only weights float16 holds exactly (see `fp16_scale`)."""
    if kernel == "int4-bf16":
        return weight.shape[0] % 16 == 0
    if kernel == FP16:
        return fp16_scale(weight) is not None
    return True


def smallest_quantum(kernel: str) -> int:
    """Half-precision outputs pad to at least 4 rows (see `half_output_allowed`): cheap where a forward reads
    weights from memory, 4 rows cost about what 1 does."""
    return 1 if kernel.endswith("-f32") else 4


@dataclass(frozen=True)
class KernelChoice:
    kernel: str
    quantum: int  # calls are padded with zero rows to a multiple of this
    ms: dict[str, float]  # padded time per TIMED_ROWS row count, as measured when chosen


class ChosenLinear(nn.Module):
    """y = x W^T + b in float32, through the kernel chosen for this weight's shape."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, device: torch.device,
                 choice: KernelChoice):
        super().__init__()
        prepare, self._run = candidates(dtype, device)[choice.kernel]
        self.weight = prepare(weight.to(values_dtype(dtype)).to(device))
        self.bias = None if bias is None else bias.to(values_dtype(dtype)).float().to(device)
        self.quantum = choice.quantum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [rows, in] float32 -> [rows, out] float32; more than MAX_ROWS rows (a batch of several requests)
        go in calls of MAX_ROWS, the row counts the kernel was checked for."""
        if x.shape[0] > MAX_ROWS:
            return torch.cat([self(x[i : i + MAX_ROWS]) for i in range(0, x.shape[0], MAX_ROWS)])
        n = x.shape[0]
        padded = -(-n // self.quantum) * self.quantum
        if padded != n:
            x = torch.cat([x, x.new_zeros(padded - n, x.shape[1])])
        y = self._run(self.weight, x)[:n]
        return y if self.bias is None else y + self.bias


# --- measurement ----------------------------------------------------------------------------------

def _padded(run: Callable, weight, quantum: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def call(x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        padded = -(-n // quantum) * quantum
        if padded != n:
            x = torch.cat([x, x.new_zeros(padded - n, x.shape[1])])
        return run(weight, x)[:n]
    return call


def _timings(calls: dict[str, Callable], x: torch.Tensor, rounds: int = 7) -> dict[str, dict[str, float]]:
    """ms per call at each TIMED_ROWS row count, for every call, with every core: the calls take turns round by
    round and each keeps its fastest round. Other work on the machine (a test run, another replica loading) only
    ever adds time, so the minimum is the least disturbed figure, and taking turns spreads a burst of that work
    over every candidate instead of condemning the one that was being timed (a choice timed once under load
    kept a kernel twice as slow as the one it beat). The thread count is the machine's, not the measuring
    process's: the choice is cached for every process, and one timed in a single-threaded test process kept a
    kernel that is the faster one on one core only (SmolLM2's `ar` lost 16% in a two-thread benchmark)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        for call in calls.values():
            call(x[:1])  # first call: one-off allocation and weight reordering
        best = {name: {str(n): float("inf") for n in TIMED_ROWS} for name in calls}
        for _ in range(rounds):
            for name, call in calls.items():
                for n in TIMED_ROWS:
                    start = time.perf_counter()
                    call(x[:n])
                    best[name][str(n)] = min(best[name][str(n)], 1000 * (time.perf_counter() - start))
    finally:
        torch.set_num_threads(threads)
    return {name: {n: round(ms, 4) for n, ms in row.items()} for name, row in best.items()}


def thread_counts() -> list[int]:
    """Thread counts a forward may run with in some process on this machine: one, this process's, all the
    cores, half of them (a Serve level replica alternates between its share of the cores and all of them)."""
    cores = os.cpu_count() or 1
    return sorted({1, torch.get_num_threads(), cores, max(1, cores // 2)})


CHECKED_ROWS = (1, 2, 3, 5, 8, 17, 33, MAX_ROWS)  # spot checks at the other thread counts


def probe(*shape: int, generator: torch.Generator) -> torch.Tensor:
    """Test inputs that make a change of accumulation order show: magnitudes spread over 2^-12..2^12 (sums that
    round differently in another order), and one value in twenty subnormal (some kernels flush those to zero
    where another code path of the same library keeps them)."""
    scale = torch.exp2(torch.randint(-12, 13, shape, generator=generator).float())
    x = torch.randn(*shape, generator=generator) * scale
    tiny = torch.rand(*shape, generator=generator) < 0.05
    return torch.where(tiny, x * 1e-42, x)


def rows_invariant(call: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> bool:
    """Every row of a call with n rows (1 <= n <= len(x)), at different places among them, equals that row
    computed alone, bitwise: every n with the process's threads, spot checks with every other thread count
    a forward may use. (Kernels differ in all three ways: by row count, by a row's place in the call, by
    threads.)"""
    alone = torch.cat([call(x[i : i + 1]) for i in range(x.shape[0])])

    def consistent(counts) -> bool:
        for n in counts:
            offset = (5 * n) % (x.shape[0] + 1 - n)  # rows land at different places for different n
            if not torch.equal(call(x[offset : offset + n]), alone[offset : offset + n]):
                return False
        return True

    if not consistent(range(2, x.shape[0] + 1)):
        return False
    return _at_each_thread_count(lambda: consistent(CHECKED_ROWS))


def _at_each_thread_count(check: Callable[[], bool]) -> bool:
    threads = torch.get_num_threads()
    try:
        for count in thread_counts():
            torch.set_num_threads(count)
            if not check():
                return False
        return True
    finally:
        torch.set_num_threads(threads)


def measure(weight: torch.Tensor, dtype: torch.dtype, device: torch.device, float_output: bool = False) -> KernelChoice:
    """The fastest row-invariant (kernel, quantum) for this weight. Candidates are tried fastest first
    (unpadded time), each at its smallest invariant quantum; the invariant ones found so far are timed again
    together, padded; the search stops once the next candidate's unpadded time cannot beat the best padded
    one. `float_output`: only kernels whose output is float32 (the LM head's logits)."""
    generator = torch.Generator().manual_seed(0)
    x = probe(MAX_ROWS, weight.shape[1], generator=generator).to(device)
    values = weight.to(values_dtype(dtype)).to(device)
    prepared = {name: (prepare(values), run)
                for name, (prepare, run) in candidates(dtype, device).items()
                if half_output_allowed(name, weight) and weight_allowed(name, values)
                and (name.endswith("-f32") or not float_output)}
    unpadded = _timings({name: _padded(run, w, 1) for name, (w, run) in prepared.items()}, x)
    for name, ms in unpadded.items():
        log.debug("kernel %s %s: %s ms unpadded", name, tuple(weight.shape), ms)
    contenders: dict[str, int] = {}  # invariant kernel -> its smallest quantum
    best: KernelChoice | None = None
    for name in sorted(unpadded, key=lambda name: sum(unpadded[name].values())):
        if best is not None and sum(unpadded[name].values()) >= sum(best.ms.values()):
            break
        w, run = prepared[name]
        quantum = next((q for q in QUANTA if q >= smallest_quantum(name) and rows_invariant(_padded(run, w, q), x)),
                       None)
        if quantum is None:
            continue
        contenders[name] = quantum
        padded = _timings({name: _padded(prepared[name][1], prepared[name][0], q) for name, q in contenders.items()},
                          x)
        fastest = min(padded, key=lambda name: sum(padded[name].values()))
        best = KernelChoice(fastest, contenders[fastest], padded[fastest])
    if best is None:
        raise RuntimeError(f"no row-invariant matmul kernel for a {tuple(weight.shape)} {dtype} weight on this "
                           "machine; report it with `lscpu` and torch's version")
    return best


def attention_quantum_invariant(quantum: int, head_dim: int, kv_heads: int, group: int,
                                generator: torch.Generator) -> bool:
    """Attention's float32 GEMMs give a query row the same bits alone and among others, with the query heads
    of a row padded from `group` to a multiple of `quantum`: the scores Q K^T and weighted values E V of rows
    sharing keys (one GEMM per KV head over up to MAX_ROWS rows' padded queries, K and V strided slices of a
    cache, at several head lengths and a tail window's TAIL_KEYS) and a tree's batched ones (one per KV head and
    row, over its own TAIL_KEYS keys, equal to the same row's GEMM over a window in place), at every thread count
    a forward may use."""
    padded = -(-group // quantum) * quantum
    rows = MAX_ROWS * padded

    def head(length: int) -> bool:
        cache = probe(2, kv_heads, length + 64, head_dim, generator=generator)
        keys, values = cache[0, :, :length], cache[1, :, :length]
        q = probe(kv_heads, rows, head_dim, generator=generator)
        e = probe(kv_heads, rows, length, generator=generator).abs()
        for a, b in ((q, keys.transpose(1, 2)), (e, values)):
            alone = torch.cat([a[:, i : i + padded] @ b for i in range(0, rows, padded)], 1)
            for n in CHECKED_ROWS:
                offset = padded * ((5 * n) % (MAX_ROWS + 1 - n))
                if not torch.equal(a[:, offset : offset + n * padded] @ b, alone[:, offset : offset + n * padded]):
                    return False
        return True

    def tail() -> bool:
        q = probe(kv_heads, MAX_ROWS, padded, head_dim, generator=generator)
        k = probe(kv_heads, MAX_ROWS, TAIL_KEYS, head_dim, generator=generator)
        e = probe(kv_heads, MAX_ROWS, padded, TAIL_KEYS, generator=generator).abs()
        v = probe(kv_heads, MAX_ROWS, TAIL_KEYS, head_dim, generator=generator)
        for a, b in ((q, k.transpose(2, 3)), (e, v)):
            alone = torch.cat([a[:, i : i + 1] @ b[:, i : i + 1] for i in range(MAX_ROWS)], 1)
            if not all(torch.equal(a[:, :n] @ b[:, :n], alone[:, :n]) for n in CHECKED_ROWS):
                return False
            # a tree's row (its window gathered) equals the same row against its window in place (a linear one)
            if not all(torch.equal(a[:, i] @ b[:, i], alone[:, i]) for i in range(0, MAX_ROWS, 7)):
                return False
        return True

    return _at_each_thread_count(lambda: all(head(length) for length in (64, TAIL_KEYS, 192, 640, 2048)) and tail())


# --- the cache of choices -------------------------------------------------------------------------

class KernelChoices:
    """Choices measured on this machine, in a JSON file per CPU signature, shared by its processes."""

    def __init__(self, path: Path | None = None):
        folder = Path(os.environ.get("HIERSPEC_KERNEL_DIR") or cache_dir() / "kernels").expanduser()
        signature = cpu_signature()
        self.path = path or folder / f"{hashlib.sha256(signature.encode()).hexdigest()[:16]}.json"
        self.signature = signature
        self._memo: dict[str, dict] = {}

    def cached(self, key: str, compute: Callable[[], dict]) -> dict:
        """The entry under `key`, computed by the first process that asks for it on this machine."""
        if key in self._memo:
            return self._memo[key]
        with exclusive(self.path.with_suffix(".lock")):  # measure once per machine; the others wait and read
            table = self._read()
            if key not in table["choices"]:
                table["choices"][key] = compute()
                self._write(table)
            self._memo[key] = table["choices"][key]
        return self._memo[key]

    def update(self, key: str, change: Callable[[dict | None], dict]) -> dict:
        """Store `change(entry)` under `key`, the entry read under the lock (so processes updating it at once
        compose): only for entries no output depends on (a cost curve measured again), never for a kernel choice,
        which every process must share."""
        with exclusive(self.path.with_suffix(".lock")):
            table = self._read()
            entry = change(table["choices"].get(key))
            table["choices"][key] = entry
            self._write(table)
            self._memo[key] = entry
        return entry

    def _read(self) -> dict:
        """The table (under the lock): a damaged file is set aside, one of another version started anew."""
        try:
            table = json.loads(self.path.read_text()) if self.path.exists() else {}
        except (OSError, json.JSONDecodeError) as error:
            damaged = self.path.with_suffix(".damaged")
            log.warning("kernel choices %s are unreadable (%s): moved to %s, measuring again", self.path, error,
                        damaged)
            self.path.replace(damaged)
            table = {}
        if table.get("version") != CHOICE_VERSION or not isinstance(table.get("choices"), dict):
            table = {"version": CHOICE_VERSION, "cpu": self.signature, "choices": {}}
        return table

    def _write(self, table: dict) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(table, indent=1, sort_keys=True))
        tmp.replace(self.path)

    def linear(self, weight: torch.Tensor, dtype: torch.dtype, device: torch.device,
               float_output: bool = False) -> KernelChoice:
        if device.type != "cpu":
            return KernelChoice(next(iter(candidates(dtype, device))), 1, {})
        out_features, in_features = weight.shape
        key = f"linear|torch {torch.__version__}|{dtype}|{in_features}x{out_features}" + \
            ("|float output" if float_output else "")
        if FP16 in candidates(dtype, device):  # weights float16 holds and those it does not: a choice each
            key += "|float16-exact" if weight_allowed(FP16, weight.to(values_dtype(dtype))) else "|not float16-exact"
        known = key in self._memo
        choice = KernelChoice(**self.cached(key, lambda: measure(weight, dtype, device, float_output).__dict__))
        if known:
            return choice
        timings = "/".join(str(choice.ms.get(str(n))) for n in TIMED_ROWS)
        log.info("kernel for %s: %s, rows padded to a multiple of %d (%s ms for %s rows)", key, choice.kernel,
                 choice.quantum, timings, "/".join(map(str, TIMED_ROWS)))
        return choice

    def attention_quantum(self, head_dim: int, kv_heads: int, group: int, device: torch.device) -> int:
        """Query heads of a row are padded to a multiple of this in attention's GEMMs (see `attention`)."""
        if device.type != "cpu":
            return 1

        def compute() -> dict:
            generator = torch.Generator().manual_seed(0)
            for quantum in QUANTA + (16,):
                if attention_quantum_invariant(quantum, head_dim, kv_heads, group, generator):
                    return {"quantum": quantum}
            raise RuntimeError("attention's float32 GEMMs are not row-invariant at any quantum on this machine")
        key = f"attention|torch {torch.__version__}|head_dim {head_dim}|kv_heads {kv_heads}|group {group}|v2"
        quantum = self.cached(key, compute)["quantum"]
        log.info("attention: query rows padded to a multiple of %d per GEMM", quantum)
        return quantum


_choices: KernelChoices | None = None


def kernel_choices() -> KernelChoices:
    """The process's view of this machine's choices (one file read per process)."""
    global _choices
    if _choices is None:
        _choices = KernelChoices()
    return _choices
