"""How much an export grows the process, phase by phase (issue 27's bound: 1.5x one layer's fp32
weights plus the embedding, or the output for a quantized export).

A tiny export first loads every library and code path the real one will use; then the kernel's
peak-RSS counter is reset (Linux /proc/self/clear_refs) and the export runs, the counter read and
reset again at each of its progress steps. Each row is the peak growth over the resident set before
the export, during the phase that step names (the export's own phases: reading the twin, each
graph, validation, writing).

    .venv/bin/python benchmarks/export_memory_phases.py HF_FOLDER SCRATCH [--quantize int4] [--dtype fp16]
        [--max-seq-len 1024] [--prefill-chunk 128]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from llamatrt.exporter.export import ExportOptions
from llamatrt.tools.pipeline import export_artifact

MIB = 1 << 20


def kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


def tiny_copy(source: Path, folder: Path) -> Path:
    """A two-layer, hidden-64 Llama with `source`'s tokenizer: the warm-up export."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = json.loads((source / "config.json").read_text())["vocab_size"]
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (source / name).exists():
            shutil.copy(source / name, folder / name)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="a Hugging Face folder")
    parser.add_argument("scratch", type=Path)
    parser.add_argument("--quantize", choices=["int4", "int8"])
    parser.add_argument("--dtype", default=ExportOptions.dtype, choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--max-seq-len", type=int, default=ExportOptions.max_cache_len)
    parser.add_argument("--prefill-chunk", type=int, default=ExportOptions.prefill_chunk)
    args = parser.parse_args()
    options = ExportOptions(
        dtype=args.dtype, quantize=args.quantize, max_cache_len=args.max_seq_len, prefill_chunk=args.prefill_chunk
    )
    args.scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.scratch) as work:
        export_artifact(tiny_copy(args.model, Path(work) / "tiny"), Path(work) / "tiny-out", options)
    reset_peak()
    before = kib("VmRSS")
    phases: list[tuple[str, int]] = []

    def step(name: str) -> None:
        if phases:
            phases[-1] = (phases[-1][0], kib("VmHWM") - before)
        phases.append((name, 0))
        reset_peak()

    out = args.scratch / "export-memory-phases"
    export_artifact(args.model, out, options, force=True, progress=step)
    step("")
    flags = f"{' --quantize ' + args.quantize if args.quantize else ''} --dtype {args.dtype} --max-seq-len {args.max_seq_len}"
    print(f"| phase of `export {args.model.name}{flags} --prefill-chunk {args.prefill_chunk}` | peak growth |")
    print("|---|---|")
    for name, grown in phases[:-1]:
        print(f"| {name} | {grown * 1024 / MIB:.0f} MiB |")
    print(f"| **whole export** | **{max(g for _, g in phases) * 1024 / MIB:.0f} MiB** |")
    shutil.rmtree(out)


if __name__ == "__main__":
    main()
