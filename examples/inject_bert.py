"""Our kernels inside a sentence-transformers model: load it, inject, embed, and compare with the original.

python examples/inject_bert.py [--model DIR] ["sentence" ...]

DIR is a sentence-transformers (or plain BERT) folder; by default all-MiniLM-L6-v2 (the embedded default model).
On a CUDA GPU in float16; on the CPU in float32, where the injected layers run the ops' NumPy reference path.
"""

import argparse

import torch
from sentence_transformers import SentenceTransformer

from cupy_transformer.interop.bert_inject import inject_bert
from cupy_transformer.loading import default_model_dir

SENTENCES = ["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby."]


def main(sentences, model_dir=None):
    """The original's and the injected model's embeddings of ``sentences`` (float32 tensors on the CPU)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    folder = str(model_dir or default_model_dir())
    original = SentenceTransformer(folder, device=device, model_kwargs={"dtype": dtype})
    injected = inject_bert(SentenceTransformer(folder, device=device, model_kwargs={"dtype": dtype}))
    want = original.encode(sentences, convert_to_tensor=True).float().cpu()
    got = injected.encode(sentences, convert_to_tensor=True).float().cpu()
    cosines = torch.nn.functional.cosine_similarity(got, want)
    print(f"injected vs original on {device} ({dtype}), cosine per sentence:")
    for sentence, cosine in zip(sentences, cosines.tolist()):
        print(f"  {sentence!r:40} {cosine:.6f}")
    return want, got


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="a sentence-transformers or BERT folder (default: all-MiniLM-L6-v2)")
    parser.add_argument("sentences", nargs="*")
    args = parser.parse_args()
    main(args.sentences or SENTENCES, args.model)
