"""Tasks with verifiable answers: seeded question generators, exact-answer rewards and accuracy evaluations.

`arithmetic`: addition of two integers in [1, 60], asked in several phrasings, with held-out test
questions disjoint from the training ones. See docs/tasks.md.
"""
