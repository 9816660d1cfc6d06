"""Generate text with a GPT-2 checkpoint folder (e.g. the Hugging Face "gpt2" files: config.json,
model.safetensors, tokenizer.json), streaming the tokens as they come.

    python examples/gpt2_generate.py MODEL_DIR "Once upon a time" [max_new_tokens]
"""

import sys

from cupy_transformer import generation
from cupy_transformer.loading import Checkpoint
from cupy_transformer.models import load_model
from cupy_transformer.runtime.arrays import gpu_available


def main(folder, prompt, max_new_tokens=30):
    backend = "cupy" if gpu_available() else "numpy"
    model = load_model(folder, "float16" if backend == "cupy" else "float32", backend)
    checkpoint = Checkpoint(folder)
    print(prompt, end="", flush=True)
    text = generation.generate(
        model,
        checkpoint.tokenizer(),
        [prompt],
        max_new_tokens,
        defaults=generation.generation_defaults(checkpoint),  # eos ids and sampling as transformers reads them
        stream=lambda _, piece: print(piece, end="", flush=True),
    )[0]
    print()
    return text


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 30)
