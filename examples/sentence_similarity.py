"""Sentence similarity with all-MiniLM-L6-v2 (the embedded default model), on the GPU when there is one.

python examples/sentence_similarity.py ["sentence" ...]
"""

import sys

from cupy_transformer.loading import default_model_dir
from cupy_transformer.models import load_model
from cupy_transformer.runtime.arrays import gpu_available

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
]


def main(sentences):
    folder = default_model_dir()
    backend = "cupy" if gpu_available() else "numpy"
    model = load_model(folder, "float16" if backend == "cupy" else "float32", backend, progress=False)
    # Tokenized, cut and pooled as the model's sentence-transformers files say; float32 NumPy rows.
    e = model.embed_texts(sentences)
    similarity = e @ e.T  # the embeddings are unit vectors: dot products are cosines
    print(f"all-MiniLM-L6-v2 on {'the GPU' if backend == 'cupy' else 'the NumPy path'}; cosine similarity:")
    for i, sentence in enumerate(sentences):
        best = max((j for j in range(len(sentences)) if j != i), key=lambda j: similarity[i, j])
        print(f"  {sentence!r:40} closest: {sentences[best]!r} ({similarity[i, best]:.4f})")
    return similarity


if __name__ == "__main__":
    main(sys.argv[1:] or SENTENCES)
