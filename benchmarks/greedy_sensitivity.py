"""Can blocks made from floats keep the fp32 model's greedy answers? A PyTorch proxy on SmolLM2's
floats (transformers' model with dequantized weights: round-to-nearest symmetric blocks of 32, the
tied head and embedding 8-bit, as `export --quantize int4` makes them): diff's four prompts, 32
greedy tokens each, the step where each answer leaves fp32's (None: never). It then ranks the
layers by the KL their 4-bit projections alone add, and gives 8-bit blocks to one more layer at a
time, most sensitive first, to see how many the greedy answers need; and it prints the fp32 model's
own margin between its two best tokens at each prompt's first steps, which is what any rounding
must not cross. Benchmarks only.   Usage: .venv/bin/python benchmarks/greedy_sensitivity.py
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llamatrt.exporter.quant_weights import rtn_quantize
from llamatrt.models.checkpoint import load_checkpoint
from llamatrt.tools.compare import DEFAULT_PROMPTS

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
STEPS = 32


def main() -> None:
    torch.set_num_threads(2)
    folder = load_checkpoint("smollm2").hf_dir
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    layers = model.model.layers

    def module(i: int, name: str) -> torch.nn.Module:
        return getattr(layers[i].self_attn if name[0] in "qkvo" else layers[i].mlp, name)

    floats = {(i, n): module(i, n).weight.data.clone() for i in range(len(layers)) for n in PROJECTIONS}
    blocks: dict[tuple[int, str, int], torch.Tensor] = {}

    def set_layer(i: int, bits: int | None) -> None:  # None: the float weights
        for n in PROJECTIONS:
            w = floats[(i, n)]
            if bits is not None and (i, n, bits) not in blocks:
                blocks[(i, n, bits)] = torch.from_numpy(rtn_quantize(w.numpy(), bits, 32).dequantize()).reshape(w.shape)
            module(i, n).weight.data = w if bits is None else blocks[(i, n, bits)]

    prompts = []
    for chat, text in DEFAULT_PROMPTS:
        if chat:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
            )
        prompts.append(tokenizer(text, add_special_tokens=False)["input_ids"])

    def greedy() -> list[list[int]]:  # STEPS tokens each, past any EOS, as diff's reference runs them
        answers = []
        with torch.no_grad():
            for p in prompts:
                x = torch.tensor([p])
                out = model.generate(
                    x,
                    attention_mask=torch.ones_like(x),
                    max_new_tokens=STEPS,
                    do_sample=False,
                    eos_token_id=None,
                    pad_token_id=0,
                )
                answers.append(out[0, len(p) :].tolist())
        return answers

    reference = greedy()
    sequences = [torch.tensor([p + r]) for p, r in zip(prompts, reference, strict=True)]
    with torch.no_grad():
        reference_logp = [torch.log_softmax(model(s).logits[0], -1) for s in sequences]
    for p, logp in zip(prompts, reference_logp, strict=True):
        top2 = logp[len(p) - 1 : len(p) - 1 + STEPS].topk(2).values
        margins = (top2[:, 0] - top2[:, 1]).numpy()
        print(f"fp32 margin of its best token over the next, first 10 steps: {np.round(margins[:10], 3).tolist()}")

    def kl() -> float:
        total, count = 0.0, 0
        with torch.no_grad():
            for s, logp in zip(sequences, reference_logp, strict=True):
                q = torch.log_softmax(model(s).logits[0], -1)
                total += (logp.exp() * (logp - q)).sum().item()
                count += logp.shape[0]
        return total / count

    def diverge() -> list[int | None]:
        return [
            next((i for i, (a, b) in enumerate(zip(x, y, strict=True)) if a != b), None)
            for x, y in zip(greedy(), reference, strict=True)
        ]

    embedding = model.model.embed_tokens.weight.data
    model.model.embed_tokens.weight.data = torch.from_numpy(
        rtn_quantize(embedding.numpy(), 8, 32).dequantize()
    ).reshape(embedding.shape)
    print(f"head 8-bit, projections fp32: KL {kl():.5f}, diverge at {diverge()}")
    for i in range(len(layers)):
        set_layer(i, 8)
    print(f"head and every projection 8-bit: KL {kl():.5f}, diverge at {diverge()}")
    sensitivity = []
    for i in range(len(layers)):
        for j in range(len(layers)):
            set_layer(j, 4 if j == i else None)
        sensitivity.append((kl(), i))
    sensitivity.sort(reverse=True)
    print("KL of one layer's projections 4-bit alone, top 8:", [(i, round(s, 4)) for s, i in sensitivity[:8]])
    for i in range(len(layers)):
        set_layer(i, 4)
    print(f"every projection 4-bit: KL {kl():.5f}, diverge at {diverge()}")
    for count, (_, i) in enumerate(sensitivity, 1):
        set_layer(i, 8)
        print(f"{count} most sensitive layers 8-bit (+ layer {i}): KL {kl():.5f}, diverge at {diverge()}", flush=True)


if __name__ == "__main__":
    main()
