"""AI judges (RLAIF): models and checks that say which of two replies is better, writing the same `lmforge`
preference records people's labels become (docs/judges.md).

    base.py      JudgeItem, Verdict, the length baseline, the position-bias rate, a verdict as a preference record
    llm.py       LLMJudge: any checkpoint's choice-token probabilities under a judging prompt, in both orders
    reward.py    RewardJudge: a reward model's scores (position bias 0 by construction)
    verifier.py  VerifierJudge: a reward function (GSM8K answers, MBPP tests, ...) against each item's reference
    stage.py     the judge stage and `lmforge judge`: a candidates file in, preference records out
"""
