"""Other engines' decoding of the same model, as baselines beside ours in `hierspec bench`.

- `hf-ar`, `hf-pld`, `hf-assisted`: transformers' own `generate()`: plain, prompt lookup (10 tokens), and
  assisted by the config's largest draft model, on the model we serve (its dtype).
- `llama.cpp`: llama.cpp's plain decoding (through llama-cpp-python) of the GGUF file our target was
  converted from, on llama.cpp's own quantised kernels: what a user would run instead of us on a CPU. It is a
  different model than ours (its quantisation, not our dequantised one), so its identity column is informative
  only. llama-cpp-python builds from source (a few minutes): `make bench-llama-cpp` installs it.

Each baseline is greedy and runs one request at a time; each returns (output ids, tokens produced counting a
stop token).
"""

from __future__ import annotations

import torch

from deploy.config import ConfigError, HierspecConfig
from services.engine.model_store import load_pretrained, resolve

HF_METHODS = ("hf-ar", "hf-pld", "hf-assisted")
LLAMA_CPP = "llama.cpp"
BASELINES = (*HF_METHODS, LLAMA_CPP)


def check_baseline(method: str, config: HierspecConfig, dtype: str, greedy: bool, concurrency: int) -> None:
    """A ConfigError (before any model loads) for a baseline that cannot run as asked."""
    if not greedy:
        raise ConfigError(f"{method} runs greedy only (another engine draws other random numbers)")
    if concurrency > 1:
        raise ConfigError(f"{method} runs one request at a time: use --concurrency 1")
    if method == "hf-assisted" and not config.hierarchy:
        raise ConfigError("hf-assisted needs a draft model in the config's hierarchy")
    if method in HF_METHODS and dtype in ("int8", "int4"):
        raise ConfigError(f"{method} runs transformers' own model, which has no {dtype} of ours: bench it with "
                          "--dtype bfloat16")
    if method == LLAMA_CPP:
        if resolve(config.models.target, download=False).gguf_file is None:
            raise ConfigError(f"{LLAMA_CPP} runs the target's GGUF file; {config.models.target!r} is not one")
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            raise ConfigError(f"{LLAMA_CPP} needs llama-cpp-python, which builds from source: "
                              "`make bench-llama-cpp` installs it") from None


class _Transformers:
    def __init__(self, config: HierspecConfig, dtype: str):
        self.target = load_pretrained(config.models.target, dtype)[0].eval()
        self.assistant = None
        if config.hierarchy:
            self.assistant = load_pretrained(config.hierarchy[-1].model, dtype)[0].eval()

    def generate(self, method: str, prompt_ids: list[int], max_tokens: int, stop_ids) -> list[int]:
        kwargs = {"hf-ar": {}, "hf-pld": {"prompt_lookup_num_tokens": 10},
                  "hf-assisted": {"assistant_model": self.assistant}}[method]
        input_ids = torch.tensor([prompt_ids])
        with torch.inference_mode():
            out = self.target.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                       max_new_tokens=max_tokens, eos_token_id=sorted(stop_ids),
                                       pad_token_id=sorted(stop_ids)[0], **kwargs)
        return out[0, len(prompt_ids):].tolist()


class _LlamaCpp:
    """The target's GGUF in llama.cpp, on as many threads as torch uses, with our target's context window; every
    turn prefilled afresh, as ours are (llama-cpp-python would otherwise keep the prefix a prompt shares with the
    previous one in its cache)."""

    def __init__(self, config: HierspecConfig, context: int):
        import llama_cpp

        resolved = resolve(config.models.target)
        path = resolved.directory / resolved.gguf_file
        self.model = llama_cpp.Llama(str(path), n_ctx=context, n_batch=512, n_threads=torch.get_num_threads(),
                                     n_threads_batch=torch.get_num_threads(), verbose=False)
        self.about = {"llama_cpp_python": llama_cpp.__version__, "gguf": path.name,
                      "threads": torch.get_num_threads()}

    def generate(self, prompt_ids: list[int], max_tokens: int, stop_ids) -> list[int]:
        out: list[int] = []
        self.model.reset()
        for token in self.model.generate(prompt_ids, temp=0.0):  # temp 0: llama.cpp's greedy sampler
            out.append(token)
            if token in stop_ids or len(out) == max_tokens:
                break
        return out


class Baselines:
    """The baselines a bench run asks for, each loaded once."""

    def __init__(self, config: HierspecConfig, dtype: str, methods: list[str], context: int):
        self._transformers = _Transformers(config, dtype) if set(methods) & set(HF_METHODS) else None
        self._llama_cpp = _LlamaCpp(config, context) if LLAMA_CPP in methods else None

    def about(self) -> dict:
        """What the result JSON records of the baselines (the llama.cpp build and file)."""
        return {LLAMA_CPP: self._llama_cpp.about} if self._llama_cpp else {}

    def generate(self, method: str, prompt_ids: list[int], max_tokens: int, stop_ids) -> tuple[list[int], int]:
        if method == LLAMA_CPP:
            new = self._llama_cpp.generate(prompt_ids, max_tokens, stop_ids)
        else:
            new = self._transformers.generate(method, prompt_ids, max_tokens, stop_ids)
        for i, token in enumerate(new):
            if token in stop_ids:
                return new[:i], i + 1
        return new, len(new)
