"""Inject our kernels into a Hugging Face model and generate with its own ``generate()``.

    python examples/inject_generate.py [MODEL_DIR_OR_HUB_NAME]

With a model (a GPT-2 or LLaMA-style checkpoint that transformers loads, with its tokenizer) it generates from a
prompt; without one it builds a tiny random GPT-2, generates greedily from a padded batch of two prompts with the
original and with an injected copy, and says whether the tokens agree. Either way it times ``generate()`` before and
after injection (greedy calls like these run on our captured decode loop: ``interop.causal_lm``). CUDA where torch
sees a GPU (fp16 for a given model), else the CPU (our NumPy path; fp32).
"""

import copy
import functools
import sys
import time

import torch
import transformers

from cupy_transformer.interop.torch import inject


def best_ms(generate, runs: int = 3) -> float:
    """The fastest of ``runs`` calls of ``generate()`` after a warm-up (the first call compiles and captures), in ms."""
    synchronize = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    times = []
    for _ in range(runs + 1):
        synchronize()
        start = time.perf_counter()
        generate()
        synchronize()
        times.append(time.perf_counter() - start)
    return min(times[1:]) * 1e3


def main(model_dir: str | None = None, max_new_tokens: int = 16):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if model_dir is not None:
        dtype = torch.float16 if device == "cuda" else torch.float32
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
        inputs = tokenizer(["Once upon a time"], return_tensors="pt").to(device)
        options = dict(**inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None)
        with torch.no_grad():  # timed without an eos: every run the same length
            before = best_ms(lambda: model.generate(**options))
            inject(model)
            after = best_ms(lambda: model.generate(**options))
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        print(tokenizer.decode(out[0], skip_special_tokens=True))
        print(f"generate() of {max_new_tokens} tokens: {before:.1f} ms before injection, {after:.1f} ms after")
        return out.tolist()
    torch.manual_seed(0)
    shape = dict(n_embd=64, n_layer=2, n_head=4, vocab_size=100, n_positions=64, initializer_range=0.3)
    config = transformers.GPT2Config(**shape, bos_token_id=None, eos_token_id=None)
    original = transformers.GPT2LMHeadModel(config).to(device).eval()
    injected = inject(copy.deepcopy(original))  # in place; returns the model
    ids = torch.tensor([[5, 17, 42, 8, 3], [0, 0, 7, 64, 21]], device=device)
    mask = (torch.arange(5, device=device) >= torch.tensor([[0], [2]], device=device)).long()  # left padding
    outputs, times = [], []
    for model in (original, injected):
        generate = functools.partial(
            model.generate, ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0
        )
        with torch.no_grad():
            outputs.append(generate())
            times.append(best_ms(generate))
    tokens = outputs[1][:, ids.shape[1] :].tolist()
    for row in tokens:
        print("generated:", row)
    print(f"identical to the original's: {torch.equal(outputs[0], outputs[1])}")
    print(f"generate() of {max_new_tokens} tokens: {times[0]:.1f} ms original, {times[1]:.1f} ms injected")
    return tokens


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
