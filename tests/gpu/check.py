"""The GPU paths a user runs, each under its own timeout, on tiny random models of SmolLM2's and Gemma-3's families.

    python tests/gpu/check.py --out DIR            # on a GPU machine: every path, one row each, within 5 minutes
    python tests/gpu/check.py --dry-run            # the paths it would run, and what it lists as not run
    python tests/gpu/check.py --out DIR --device cpu   # the same paths on the CPU (gloo; fp16 autocast on the CPU)

Each path runs in a process of its own (``torch.distributed.run`` with one process: a process group, NCCL on a GPU,
as the README's multi-GPU command has; NCCL refuses two ranks on one device), trains an ``ESTrainer`` 2 steps with the
off-task KL (``KLDriftCallback``, exact) and the parameter drift measured every step, and appends its row to
``DIR/rows.jsonl`` as it finishes: ran, or failed with the error's last line. The table is printed at the end and
written to ``DIR/table.md``. ZeRO-3 and the speed table are listed as not run.

On the lent GPU machine (torch, transformers and accelerate installed; no trl, datasets or deepspeed), carry wheels
as .library/device/README.md says: `pip download --no-deps` trl, datasets, torchmetrics, pyarrow, dill, xxhash,
multiprocess and this project's own wheel into an ignored `.whl/`, install them with `--target /tmp/site`, then
`PYTHONPATH=/tmp/site:. python tests/gpu/check.py --out $OUT`.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PATHS = {  # name: (model family, ESConfig settings, dtype of the weights)
    "smollm2 lowrank bf16-mixed": ("llama", {"bf16": True}, "float32"),
    "smollm2 lowrank fp16-mixed": ("llama", {"fp16": True}, "float32"),
    "smollm2 full fp16-mixed": ("llama", {"fp16": True, "perturbation": "full"}, "float32"),
    "smollm2 lowrank bf16-weights": ("llama", {"bf16": False}, "bfloat16"),
    "smollm2 full bf16-weights": ("llama", {"bf16": False, "perturbation": "full"}, "bfloat16"),
    "smollm2 lowrank fp32 compiled": ("llama", {"bf16": False, "torch_compile": True}, "float32"),
    "smollm2 lowrank fp16 trainer-optimizer": ("llama", {"fp16": True, "es_optimizer": "trainer", "optim": "adamw_torch",
                                                        "learning_rate": 1e-5}, "float32"),
    "gemma3 lowrank bf16-mixed": ("gemma3", {"bf16": True}, "float32"),
    "gemma3 full bf16-mixed beta": ("gemma3", {"bf16": True, "perturbation": "full", "beta": 0.1}, "float32"),
}
NOT_RUN = {"zero3": "DeepSpeed ZeRO-3 needs deepspeed, which the GPU image lacks (run on CPU by tests/test_distributed.py)",
           "speed table": "benchmarks/es_speed_gpu.py, about 10 minutes: beyond this check's budget"}
TIMEOUT = 25  # seconds per path, the process's start included; compiling takes longer (about 60 s on a 2-core CPU)
COMPILE_TIMEOUT = 120


def timeout(settings: dict) -> int:
    return COMPILE_TIMEOUT if settings.get("torch_compile") else TIMEOUT


def tiny_model(family: str, tokenizer, dtype):
    """A tiny random model of the family's architecture (config only: nothing is downloaded)."""
    import torch
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig

    common = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
                  initializer_range=0.2)
    if family == "llama":  # SmolLM2's family
        config = LlamaConfig(**common)
    else:
        config = Gemma3TextConfig(**common, head_dim=16, sliding_window=8, query_pre_attn_scalar=16)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(getattr(torch, dtype))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def run_path(name: str, device: str, out: Path) -> None:
    """One path, inside the process group torch.distributed.run made."""
    import torch
    import torch.distributed as dist
    from datasets import Dataset

    sys.path.insert(0, str(HERE.parent))
    from tiny import build_tokenizer
    from trl_ext import ESConfig, ESTrainer
    from trl_ext.callbacks import KLDriftCallback, ParameterDriftCallback

    family, settings, dtype = PATHS[name]
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    tokenizer = build_tokenizer()
    prompts = ["the quick brown", "what is 12", "count the apples", "lazy dog"]
    args = ESConfig(output_dir=str(out / "runs" / name.replace(" ", "_")), max_steps=2, population_size=4,
                    max_completion_length=8, report_to="none", save_strategy="no", disable_tqdm=True,
                    logging_steps=1, use_cpu=device == "cpu", **settings)
    trainer = ESTrainer(tiny_model(family, tokenizer, dtype), lambda completion_ids, **kw: [
        sum(t < 150 for t in ids) / max(1, len(ids)) for ids in completion_ids], args=args,
        train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tokenizer)
    trainer.add_callback(KLDriftCallback(trainer, prompts[:3], every_n_steps=1, estimator="exact"))
    trainer.add_callback(ParameterDriftCallback(trainer, every_n_steps=1))
    trainer.train()
    logged = {k: v for log in trainer.state.log_history for k, v in log.items()}
    row = {"path": name, "result": "ran", "device": str(trainer.accelerator.device), "steps": trainer.state.global_step,
           "drift/kl": logged.get("drift/kl"), "es/update_norm": logged.get("es/update_norm"),
           "backend": dist.get_backend()}
    (out / f"row-{name.replace(' ', '_')}.json").write_text(json.dumps(row))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/gpu-check"))
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--only", default="", help="run the paths whose name contains this")
    parser.add_argument("--path", help=argparse.SUPPRESS)  # one path, in the child process
    args = parser.parse_args()
    if args.path:
        run_path(args.path, args.device, args.out)
        return
    if args.dry_run:
        for name, (family, settings, dtype) in PATHS.items():
            print(f"would run: {name}: {family}, weights {dtype}, {settings}, timeout {timeout(settings)} s")
        for name, why in NOT_RUN.items():
            print(f"not run: {name}: {why}")
        return
    args.out.mkdir(parents=True, exist_ok=True)
    rows = args.out / "rows.jsonl"
    for port, name in enumerate([name for name in PATHS if args.only in name], start=29600):
        started = time.perf_counter()
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", str(port),
                   __file__, "--path", name, "--device", args.device, "--out", str(args.out)]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=timeout(PATHS[name][1]),
                                    env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"})
            done = args.out / f"row-{name.replace(' ', '_')}.json"
            if result.returncode == 0 and done.exists():
                row = json.loads(done.read_text())
            else:
                errors = [line for line in result.stderr.splitlines() if "Error" in line or "error" in line]
                row = {"path": name, "result": "failed", "error": (errors or result.stderr.splitlines() or ["?"])[-1]}
        except subprocess.TimeoutExpired:
            row = {"path": name, "result": "failed", "error": f"timed out after {timeout(PATHS[name][1])} s"}
        row["seconds"] = round(time.perf_counter() - started, 1)
        with rows.open("a") as file:
            file.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    table = ["| path | result | seconds | detail |", "| --- | --- | --- | --- |"]
    for line in rows.read_text().splitlines():
        row = json.loads(line)
        detail = row.get("error") or f"{row['device']}, {row['backend']}, drift/kl {row['drift/kl']}"
        table.append(f"| {row['path']} | {row['result']} | {row['seconds']} | {detail} |")
    table += [f"| {name} | not run | | {why} |" for name, why in NOT_RUN.items()]
    (args.out / "table.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
