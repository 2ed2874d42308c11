"""Which images to label next: strategies over scores and embeddings (k-center, TypiClust, hybrid)."""

from __future__ import annotations

import numpy as np

from medclass.errors import MedClassError

#: Every selection strategy and what it picks: the one table the CLI, the MONAI Label app and
#: the Slicer module read (the Slicer client keeps a copy only for when it runs without medclass).
STRATEGY_DESCRIPTIONS = {
    "random": "a random unlabelled image",
    "entropy": "the unlabelled image whose predicted probabilities have the highest entropy",
    "margin": "the unlabelled image with the smallest margin between its two most likely classes",
    "least-confidence": "the unlabelled image whose most likely class is least probable",
    "bald": "the image the model's Monte-Carlo dropout samples disagree on most (BALD)",
    "coreset": "the image farthest from every labelled one in the model's embedding space (diversity)",
    "hybrid": "among the most uncertain images, the one farthest from the labelled ones",
    "typiclust": "the most typical image of the largest cluster no labelled image covers (cold start)",
}
STRATEGIES = tuple(STRATEGY_DESCRIPTIONS)
#: What each strategy ranks by, beyond the pool itself: the scoring run's uncertainty scores
#: (``hybrid`` uses entropy) and the served model's embeddings of the images. The app asks the
#: scoring task for whichever a strategy needs; :func:`medclass.labeling.choose_next` checks them.
NEEDS_SCORES = frozenset({"entropy", "margin", "least-confidence", "bald", "hybrid"})
NEEDS_EMBEDDINGS = frozenset({"coreset", "hybrid", "typiclust"})
# Strategies that need no model, only embeddings: they can pick the very first images.
COLD_START = ("random", "coreset", "typiclust")
# TypiClust: typicality is the inverse mean distance to this many nearest neighbours in the
# cluster; at most this many clusters (Hacohen et al. 2022 use 20 and 500).
TYPICLUST_KNN = 20
TYPICLUST_MAX_CLUSTERS = 500
# Hybrid: candidates per image to label (the k most diverse of the 4k most uncertain).
HYBRID_FACTOR = 4


# --------------------------------------------------------------------------- selection


def _min_sq_distances(points: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Squared L2 distance of each point to its nearest center (scikit-learn's chunked search)."""
    from sklearn.metrics import pairwise_distances_argmin_min

    if len(centers) == 0:
        return np.full(len(points), np.inf)
    _, dist = pairwise_distances_argmin_min(points, centers, metric="sqeuclidean")
    return np.maximum(dist, 0.0)


def _as_matrix(a: np.ndarray, what: str) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 2:
        raise MedClassError(f"{what} must be a matrix (N, F), got shape {a.shape}",
                            "pass the 'embedding' returned by score_pool()")
    if not np.isfinite(a).all():
        raise MedClassError(f"{what} hold NaN or infinite values", "re-run scoring; check the model")
    return a


def k_center_greedy(pool: np.ndarray, labelled: np.ndarray | None, k: int, seed: int = 0) -> list[int]:
    """Greedy k-center (core-set) selection: each pick is the pool point farthest from
    everything labelled or picked so far.

    Parameters
    ----------
    pool : np.ndarray
        ``(N, F)`` embeddings of the unlabelled images.
    labelled : np.ndarray or None
        ``(M, F)`` embeddings of the labelled images; None or empty: the first pick is a
        seeded random pool point.
    k : int
        Number of picks; fewer when the pool is smaller.
    seed : int
        Seeds the first pick of a cold start.

    Returns
    -------
    list of int
        Distinct indices into ``pool``, in the order picked.
    """
    pool = _as_matrix(pool, "pool embeddings")
    n = len(pool)
    k = min(int(k), n)
    if k <= 0:
        return []
    if labelled is not None and np.size(labelled):
        labelled = _as_matrix(labelled, "labelled embeddings")
        if labelled.shape[1] != pool.shape[1]:
            raise MedClassError(f"labelled embeddings have {labelled.shape[1]} features, the pool's "
                                f"{pool.shape[1]}", "score both with the same model")
        dist = _min_sq_distances(pool, labelled)
        picks: list[int] = []
    else:
        first = int(np.random.default_rng(seed).integers(n))
        dist = _min_sq_distances(pool, pool[first : first + 1])
        picks = [first]
    pool_sq = (pool * pool).sum(axis=1)
    dist[picks] = -np.inf
    while len(picks) < k:
        c = int(np.argmax(dist))
        picks.append(c)
        d = pool_sq + pool_sq[c] - 2.0 * (pool @ pool[c])
        dist = np.minimum(dist, np.maximum(d, 0.0))
        # A picked point never comes back, even when duplicates leave every distance at 0.
        dist[picks] = -np.inf
    return picks


def typiclust(pool: np.ndarray, labelled: np.ndarray | None, k: int, seed: int = 0,
              knn: int = TYPICLUST_KNN, max_clusters: int = TYPICLUST_MAX_CLUSTERS) -> list[int]:
    """TypiClust selection (Hacohen et al. 2022): typical images of uncovered clusters.

    Parameters
    ----------
    pool : np.ndarray
        ``(N, F)`` embeddings of the unlabelled images.
    labelled : np.ndarray or None
        ``(M, F)`` embeddings of the labelled images (None or empty: a cold start).
    k : int
        Number of picks; fewer when the pool is smaller.
    seed : int
        Seeds k-means; the picks are a deterministic function of the inputs and the seed.
    knn, max_clusters : int
        Neighbours for typicality; the cap on the number of clusters.

    Returns
    -------
    list of int
        Distinct indices into ``pool``, each from another cluster while uncovered ones remain.
    """
    from sklearn.cluster import KMeans

    pool = _as_matrix(pool, "pool embeddings")
    n = len(pool)
    k = min(int(k), n)
    if k <= 0:
        return []
    lab = np.zeros((0, pool.shape[1])) if labelled is None or not np.size(labelled) else \
        _as_matrix(labelled, "labelled embeddings")
    if lab.shape[1] != pool.shape[1]:
        raise MedClassError(f"labelled embeddings have {lab.shape[1]} features, the pool's {pool.shape[1]}",
                            "score both with the same model")
    # Unit length: a pretrained encoder's embedding differs by direction more than by norm.
    both = np.vstack([pool, lab])
    both = both / np.maximum(np.linalg.norm(both, axis=1, keepdims=True), 1e-12)
    n_clusters = int(min(len(lab) + k, max_clusters, n))
    km = KMeans(n_clusters=n_clusters, n_init=1, random_state=seed).fit(both)
    cl_pool, cl_lab = km.labels_[:n], km.labels_[n:]
    size = np.bincount(km.labels_, minlength=n_clusters)
    covered = np.bincount(cl_lab, minlength=n_clusters).astype(float)
    members = {c: np.flatnonzero(cl_pool == c) for c in range(n_clusters)}
    taken = np.zeros(n, bool)
    picks: list[int] = []
    x = both[:n]
    while len(picks) < k:
        avail = np.array([c for c in range(n_clusters) if (~taken[members[c]]).any()])
        # Fewest labelled first, then the largest cluster; the cluster index breaks ties.
        c = int(avail[np.lexsort((avail, -size[avail], covered[avail]))[0]])
        idx = members[c][~taken[members[c]]]
        ref = x[members[c]]
        d = np.sqrt(np.maximum(_pairwise_sq(x[idx], ref), 0.0))
        kk = min(knn, len(ref) - 1)
        if kk >= 1:
            d.sort(axis=1)
            typicality = 1.0 / (d[:, 1:kk + 1].mean(axis=1) + 1e-12)  # column 0: the point itself
        else:
            typicality = np.ones(len(idx))
        best = int(idx[np.lexsort((idx, -typicality))[0]])
        picks.append(best)
        taken[best] = True
        covered[c] += 1
    return picks


def _pairwise_sq(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)


def _check_scores(scores: np.ndarray | None, strategy: str) -> np.ndarray:
    if scores is None:
        method = "an uncertainty method" if strategy == "hybrid" else repr(strategy)
        raise MedClassError(f"strategy {strategy!r} needs scores",
                            f"score the pool with {method} first (score_pool(loaded, x, methods=[...]))")
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1:
        raise MedClassError(f"scores must be one number per pool image, got shape {s.shape}",
                            "pass one of the (N,) arrays score_pool() returns")
    bad = np.flatnonzero(~np.isfinite(s))
    if len(bad):
        raise MedClassError(f"{len(bad)} of {len(s)} scores are NaN or infinite (e.g. pool index {bad[0]})",
                            "scoring failed for those images: re-score them; a failure is never ranked")
    return s


def _top_k(scores: np.ndarray, k: int, seed: int) -> np.ndarray:
    # lexsort: the last key is primary; a seeded random key breaks ties.
    tiebreak = np.random.default_rng(seed).random(len(scores))
    return np.lexsort((tiebreak, -scores))[:k]


def select(
    strategy: str,
    k: int,
    scores: np.ndarray | None = None,
    pool_embeddings: np.ndarray | None = None,
    labelled_embeddings: np.ndarray | None = None,
    seed: int = 0,
    pool_size: int | None = None,
) -> list[int]:
    """The ``k`` pool images to label next.

    Parameters
    ----------
    strategy : str
        One of :data:`STRATEGIES`: ``random`` (seeded permutation), ``entropy`` /
        ``margin`` / ``least-confidence`` / ``bald`` (top-k of ``scores``), ``coreset``
        (:func:`k_center_greedy` on ``pool_embeddings``), ``hybrid`` (the ``4k`` highest
        ``scores``, then k-center among them), ``typiclust`` (:func:`typiclust` on
        ``pool_embeddings``: needs no scores, the cold-start choice).
    k : int
        How many to pick; fewer when the pool is smaller.
    scores : np.ndarray, optional
        ``(N,)`` scores of the pool (the matching method for a score strategy; any
        uncertainty for ``hybrid``).
    pool_embeddings : np.ndarray, optional
        ``(N, F)`` pool embeddings (``coreset``, ``hybrid``).
    labelled_embeddings : np.ndarray, optional
        ``(M, F)`` embeddings of the images already labelled (``coreset``, ``hybrid``).
    seed : int
        Seeds ``random``, tie-breaking and the cold-start pick.
    pool_size : int, optional
        The pool's size, for ``random`` when neither ``scores`` nor ``pool_embeddings``
        is given.

    Returns
    -------
    list of int
        Distinct indices into the pool, most wanted first.

    Raises
    ------
    MedClassError
        For an unknown strategy, a missing input, or NaN scores.
    """
    if strategy not in STRATEGIES:
        raise MedClassError(f"unknown active-learning strategy {strategy!r}", f"use one of {', '.join(STRATEGIES)}")
    k = int(k)
    if k < 0:
        raise MedClassError(f"cannot select {k} images", "ask for k >= 0")
    sizes = {}
    for name, a in (("scores", scores), ("pool_embeddings", pool_embeddings)):
        if a is not None:
            shape = np.shape(a)
            if not shape:
                raise MedClassError(f"{name} must hold one entry per pool image, got a scalar",
                                    "pass the arrays score_pool() returns")
            sizes[name] = shape[0]
    if pool_size is not None:
        sizes["pool_size"] = int(pool_size)
    if len(set(sizes.values())) > 1:
        raise MedClassError(f"the pool inputs disagree on its size ({sizes})",
                            "pass scores and embeddings of the same images, in the same order")
    if strategy == "random":
        if not sizes:
            raise MedClassError("random selection needs the pool's size",
                                "pass pool_size, scores or pool_embeddings")
        n = next(iter(sizes.values()))
        return [int(i) for i in np.random.default_rng(seed).permutation(n)[:k]]
    if strategy == "typiclust":
        if pool_embeddings is None:
            raise MedClassError("strategy 'typiclust' needs pool_embeddings",
                                "pass embeddings of the pool from a pretrained encoder or the served model")
        return typiclust(pool_embeddings, labelled_embeddings, k, seed)
    if strategy == "coreset":
        if pool_embeddings is None:
            raise MedClassError("strategy 'coreset' needs pool_embeddings",
                                "pass the 'embedding' returned by score_pool() for the pool")
        return k_center_greedy(pool_embeddings, labelled_embeddings, k, seed)
    s = _check_scores(scores, strategy)
    if strategy != "hybrid":
        return [int(i) for i in _top_k(s, k, seed)]
    if pool_embeddings is None:
        raise MedClassError("strategy 'hybrid' needs pool_embeddings as well as scores",
                            "pass the 'embedding' returned by score_pool() for the pool")
    emb = _as_matrix(pool_embeddings, "pool embeddings")
    candidates = _top_k(s, HYBRID_FACTOR * k, seed)
    picked = k_center_greedy(emb[candidates], labelled_embeddings, k, seed)
    return [int(candidates[i]) for i in picked]
