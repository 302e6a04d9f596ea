"""Embedding maps: texts placed in 2-D (PCA, t-SNE), and how their categories sit among the similarities.

    EmbeddingSet ──► unit vectors (L2-normalised, float64): distances on the map follow the cosine
                     similarity the rest of `embed` shows, not the vectors' norms
        ──► pca   numpy: SVD of the centred unit vectors; coordinates U·S of the first two components,
                  each axis's sign fixed (its largest loading positive, as scikit-learn's svd_flip) so
                  the same vectors always give the same map
        ──► tsne  scikit-learn's TSNE (the optional `maps` extra): perplexity below the number of texts,
                  init "pca", learning rate "auto", Barnes-Hut; a fixed seed gives the same map every time
                  (one OpenMP thread below 1000 texts: faster there, and the map does not depend on it)
        ──► DataFrame (term, category, x, y); .attrs: method, perplexity, seed, explained (PCA's share
            of the variance per axis)

Categories come from --file (`term<TAB>category` lines, or JSONL with "text" and "category"; read by
inputs.read_terms), one per text or none:
  category_order    the texts grouped by category (categories in the order they first appear, texts
                    in file order within one): the heatmap's order, so blocks on the diagonal show
                    whether the model puts a category's texts together
  category_summary  per category: texts, mean cosine over its pairs, mean cosine to the texts outside it,
                    how many of its texts have their nearest neighbour inside it (and what chance gives)
Nothing here loads a model; check_map refuses a request it cannot serve (perplexity >= n, t-SNE
without scikit-learn) before the command loads one. Drawing is in reports/plots.py. numpy and pandas are
imported inside the functions, so that the CLI reads the defaults here without loading them.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from llamalens.errors import InvalidArgument, InvalidInput, InvalidSettings, MissingExtra

if TYPE_CHECKING:
    import numpy as np

METHODS = ("pca", "tsne")
DEFAULT_PERPLEXITY = 5.0  # the tutorial's; scikit-learn's own default (30) needs more than 30 texts
DEFAULT_SEED = 0
MAX_SEED = 2**32 - 1  # numpy's RandomState, which TSNE seeds
SAME_BELOW = 1e-9  # unit vectors no further than this from their mean are one point to t-SNE
ONE_THREAD_BELOW = 1000  # texts; t-SNE of 500 takes 2 CPU-seconds on one thread


def _tsne_class():
    try:
        from sklearn.manifold import TSNE
    except ImportError:
        raise MissingExtra("--map tsne needs scikit-learn, llamalens's optional 'maps' extra: "
                           "pip install 'llamalens[maps]' (or pip install scikit-learn), or use --map pca") from None
    return TSNE


def check_map(method: str, n_texts: int, perplexity: float = DEFAULT_PERPLEXITY, seed: int = DEFAULT_SEED,
              distinct: int | None = None) -> None:
    """Refuse a map that cannot be made (before any model is loaded); `distinct`: how many of the texts differ."""
    if method not in METHODS:
        raise InvalidSettings(f"--map {method!r} is not one of {', '.join(METHODS)}")
    if n_texts < 2:
        raise InvalidInput(f"a map needs at least two texts (got {n_texts})")
    if method != "tsne":
        return
    if not (math.isfinite(perplexity) and perplexity > 0):
        raise InvalidSettings(f"--perplexity {perplexity:g} must be a positive number, e.g. 5")
    if perplexity >= n_texts:
        raise InvalidSettings(f"--perplexity {perplexity:g} is too large for {n_texts} texts: t-SNE needs a perplexity "
                              f"below the number of texts; give --perplexity {max(1, n_texts // 3)} (or any value "
                              f"below {n_texts}), or more texts")
    if not 0 <= seed <= MAX_SEED:
        raise InvalidSettings(f"--seed {seed} must be between 0 and {MAX_SEED}")
    if distinct is not None and distinct < 2:
        raise _all_alike(n_texts, "the same text")
    _tsne_class()


def _all_alike(n: int, what: str) -> InvalidInput:
    # scikit-learn's PCA initialisation divides by the spread of the first axis: zero spread gives NaN
    # coordinates, and its Barnes-Hut tree then crashes the process
    return InvalidInput(f"the {n} texts are all {what}: t-SNE cannot place identical points (scikit-learn would "
                        "crash); give at least two different texts, or use --map pca")


def pca(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rows' coordinates on their first two principal components (n × 2), and the share of the
    variance each component explains."""
    import numpy as np

    x = np.asarray(vectors, dtype=np.float64)
    u, s, vt = np.linalg.svd(x - x.mean(axis=0), full_matrices=False)
    k = min(2, len(s))
    signs = np.sign(vt[np.arange(k), np.argmax(np.abs(vt[:k]), axis=1)])
    signs[signs == 0] = 1.0
    xy = np.zeros((len(x), 2))
    xy[:, :k] = u[:, :k] * (s[:k] * signs)
    explained = np.zeros(2)
    total = float((s * s).sum())
    if total > 0:
        explained[:k] = s[:k] ** 2 / total
    return xy, explained


def tsne(vectors: np.ndarray, perplexity: float = DEFAULT_PERPLEXITY, seed: int = DEFAULT_SEED) -> np.ndarray:
    """scikit-learn's t-SNE of the rows in 2-D (n × 2), deterministic for a seed."""
    import numpy as np

    check_map("tsne", len(vectors), perplexity, seed)
    x = np.asarray(vectors, dtype=np.float64)
    if float(np.abs(x - x.mean(axis=0)).max()) < SAME_BELOW:
        raise _all_alike(len(x), "one vector")
    from threadpoolctl import threadpool_limits  # a dependency of scikit-learn

    model = _tsne_class()(n_components=2, perplexity=float(perplexity), random_state=seed, init="pca",
                          learning_rate="auto")
    # Barnes-Hut opens OpenMP parallel regions at each of its 1000 iterations: for a few hundred texts they
    # cost more than they save, and on a busy CPU each one waits for descheduled threads (25 texts, 2 loaded
    # cores: 126 s with 2 threads, 0.26 s with one). The map is the same for any thread count.
    with threadpool_limits(limits=1 if len(vectors) < ONE_THREAD_BELOW else None, user_api="openmp"):
        return model.fit_transform(x).astype(np.float64)


def embedding_map(es, method: str = "pca", categories: list[str] | None = None,
                  perplexity: float = DEFAULT_PERPLEXITY, seed: int = DEFAULT_SEED):
    """An EmbeddingSet's texts placed in 2-D: a DataFrame (term, category, x, y), one row per text in order.

    method: "pca" (numpy) or "tsne" (scikit-learn: perplexity below the number of texts, seeded).
    """
    import numpy as np

    import pandas as pd

    if not (hasattr(es, "texts") and hasattr(es, "unit")):
        raise InvalidArgument(f"es={es!r:.40}: give the EmbeddingSet that embed_texts(model, texts) returns")
    n = len(es.texts)
    check_map(method, n, perplexity, seed, distinct=len(set(es.texts)))
    check_categories(categories, n)
    unit = es.unit()
    if not np.all(np.isfinite(unit)):
        raise InvalidInput("some vectors hold NaN or infinite values (the model's output overflowed); they cannot "
                           "be placed on a map")
    explained = None
    if method == "pca":
        xy, explained = pca(unit)
    else:
        xy = tsne(unit, perplexity, seed)
    frame = pd.DataFrame({"term": list(es.texts), "category": list(categories) if categories else [None] * n,
                          "x": xy[:, 0], "y": xy[:, 1]})
    frame.attrs.update(method=method, perplexity=float(perplexity) if method == "tsne" else None,
                       seed=int(seed) if method == "tsne" else None,
                       explained=[float(v) for v in explained] if explained is not None else None)
    return frame


def check_categories(categories: list[str] | None, n_texts: int) -> None:
    if categories is None:
        return
    if len(categories) != n_texts:
        raise InvalidInput(f"{len(categories)} categories for {n_texts} texts; give one category per text, or none")
    for i, c in enumerate(categories, 1):
        if not isinstance(c, str) or not c.strip():
            raise InvalidInput(f"text {i} has an empty category; give every text a category, or none")


def category_order(categories: list[str]) -> list[int]:
    """Indices of the texts grouped by category: categories in order of first appearance, texts in order."""
    first: dict[str, int] = {}
    for c in categories:
        first.setdefault(c, len(first))
    return sorted(range(len(categories)), key=lambda i: first[categories[i]])


def category_summary(es, categories: list[str]):
    """Per category (in order of first appearance): texts, mean cosine within (over its pairs; NaN for one
    text), mean cosine to the texts of other categories (NaN if there are none), and how many of its texts
    have their nearest neighbour in it, with the number chance would give ((size - 1) / (n - 1) per text)."""
    import numpy as np

    import pandas as pd

    check_categories(categories, len(es.texts))
    cos = es.cosine()
    n = len(categories)
    cats = np.array(categories, dtype=object)
    nearest = [j for j, _ in es.nearest()]
    rows = []
    for c in dict.fromkeys(categories):
        inside = np.flatnonzero(cats == c)
        outside = np.flatnonzero(cats != c)
        pairs = cos[np.ix_(inside, inside)][np.triu_indices(len(inside), k=1)]
        rows.append({"category": c, "texts": len(inside),
                     "within": float(pairs.mean()) if pairs.size else float("nan"),
                     "between": float(cos[np.ix_(inside, outside)].mean()) if outside.size else float("nan"),
                     "nearest_inside": int(sum(nearest[i] >= 0 and cats[nearest[i]] == c for i in inside)),
                     "chance": len(inside) * (len(inside) - 1) / (n - 1) if n > 1 else float("nan")})
    return pd.DataFrame(rows, columns=["category", "texts", "within", "between", "nearest_inside", "chance"])
