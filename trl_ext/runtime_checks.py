"""What ESTrainer checks of the platform it runs on: DeepSpeed's layout, and whether decoding can be compiled."""

import logging
import os
import shutil

import torch
from accelerate.utils import TorchDynamoPlugin
from transformers import CompileConfig

from lightning_es.engine.zero3 import check_zero3_config

logger = logging.getLogger(__name__)


def cannot_compile(device: torch.device, backend: str = "inductor", sharded: bool = False) -> str | None:
    """Why ``torch.compile`` cannot compile decoding on ``device`` with ``backend`` here, or None."""
    import torch._dynamo
    from torch.utils._triton import has_triton

    if not torch._dynamo.is_dynamo_supported():
        return f"torch.compile is not supported with this Python and PyTorch ({torch.__version__})"
    if sharded:
        return "under DeepSpeed ZeRO-3, whose parameter gathers in every forward a compiled step cannot capture"
    if backend != "inductor":
        return None
    if device.type == "cpu" and not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "clang++")):
        return "inductor needs a C++ compiler on the CPU and none was found (set CXX)"
    if device.type == "cuda" and not has_triton():
        return "inductor needs Triton on this GPU and it is not available"
    return None


def _check_prompt_column(dataset, argument: str) -> None:
    if isinstance(dataset, dict):
        for name, split in dataset.items():
            _check_prompt_column(split, f"{argument}[{name!r}]")
        return
    columns = getattr(dataset, "column_names", None)
    if columns is not None and "prompt" not in columns:
        raise ValueError(
            f"{argument} has no 'prompt' column (its columns: {columns}). Rename the column holding the prompts, "
            f"e.g. dataset.rename_column('question', 'prompt')."
        )


class RuntimeChecks:
    """Mixin of ``ESTrainer``: the DeepSpeed layout and compiled decoding."""

    def _build_accelerator_args(self, **kwargs):
        args = super()._build_accelerator_args(**kwargs)
        # torch_compile compiles the members' decoding (_compile_decoding); accelerate would compile the whole model,
        # which ES never runs forward and backward as a training step
        args["dynamo_plugin"] = TorchDynamoPlugin(backend="no")
        return args

    def _compile_decoding(self) -> None:
        """``torch_compile``: transformers' ``generate`` compiles the decoding steps over a static KV cache (or the
        compileable cache ``cache_implementation`` names), with ``torch_compile_backend`` and ``torch_compile_mode``;
        the low-rank hooks read buffers refilled in place, so one compiled step serves every population. Where this
        platform cannot compile, a one-line warning and eager decoding."""
        backend = self.args.torch_compile_backend or "inductor"
        why_not = cannot_compile(self.accelerator.device, backend, self.sharded)
        if why_not:
            logger.warning("torch_compile=True: decoding runs eagerly, %s.", why_not)
            return
        config = self.generation_config
        config.cache_implementation = config.cache_implementation or "static"
        self.generation_kwargs["cache_implementation"] = config.cache_implementation
        config.disable_compile = False
        mode = self.args.torch_compile_mode or ("reduce-overhead" if self.accelerator.device.type == "cuda" else "default")
        config.compile_config = CompileConfig(backend=backend, mode=mode)
        config.compile_config._compile_all_devices = True  # transformers compiles on accelerators only by default

    def _check_deepspeed(self) -> bool:
        """True for the sharded layout: DeepSpeed ZeRO-3, one model over all processes."""
        if not self.is_deepspeed_enabled:
            return False
        check_zero3_config(self.accelerator.state.deepspeed_plugin.deepspeed_config)
        self.args.check_sharded()
        if self.args.es_optimizer != "sgd":
            raise ValueError(
                f"es_optimizer={self.args.es_optimizer!r} under DeepSpeed ZeRO-3: ESTrainer perturbs and updates the "
                "partitions in place, and a torch optimizer cannot step partitioned parameters. Set es_optimizer='sgd'.")
        if self.args.save_on_each_node:
            raise ValueError(
                "save_on_each_node=True with DeepSpeed ZeRO-3: ESTrainer gathers the ES state of a checkpoint on the "
                "first process only. Save on one node (save_on_each_node=False) to a filesystem every node can read."
            )
        return True
