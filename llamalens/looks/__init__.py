"""One-shot looks at a model that store no run: the next-token distribution, scoring, embeddings.

    next_token.py  a text's tokens, the next-token distribution and the sampler chain's view of it
    score.py       teacher-forced analyses: score a text, choose between continuations, compare two models
    embed.py       embeddings of texts and their cosine similarities
    embed_map.py   embedding maps in 2-D (PCA, t-SNE)
"""
