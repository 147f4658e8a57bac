"""Active teacher queries: the `query` stage's library side, above `cache` and `training`.

Owns: the scores that rank unqueried sample-views by the student alone (`scores`: entropy, margin, diversity by
k-center greedy on the student's penultimate features) and the round loop that trains students on the calls
made so far and asks the teacher about the best-scored (`rounds`: `query_store`, `run_query`).

May import: `pipeline.cache` (the store it writes, the teacher pass, budgets), `pipeline.training` (the round
students: the same loss, pool and loop as `distill`), `pipeline.losses`, `pipeline.models`, `pipeline.data` and
the core. Nothing imports it but its stage: a teacher's `teach` stage never depends on student code.

Add a score: a branch of `scores.select`, its name in `scores.SCORES` and `config.QUERY_SCORES` (and in
`scores.NEEDS_FEATURES` if it reads the student's features).
"""

from pipeline._lazy import lazy_exports

__getattr__, __all__ = lazy_exports(
    __name__,
    {
        "SCORES": "scores",
        "select": "scores",
        "plan_rounds": "rounds",
        "query_store": "rounds",
        "run_query": "rounds",
    },
)
