"""Evaluation of the DCR pipeline: generation, refusal judging, refusal probability,
layer separability, refusal tracking during SFT, and Table-1 style reports."""

from dcr_fast.evaluation.evaluate import EvalConfig, evaluate
from dcr_fast.evaluation.generation import GenerationConfig, chat_texts, generate
from dcr_fast.evaluation.refusal import (
    XSTEST_REFUSAL_PREFIXES,
    GuardJudge,
    Judge,
    RefusalFilter,
    compliance_rate,
    defense_success,
    is_refusal,
    strmatch_label,
)
from dcr_fast.evaluation.refusal_prob import (
    REFUSAL_SET,
    candidate_log_probs,
    candidate_log_probs_reference,
    refusal_probability,
)
from dcr_fast.evaluation.report import write_report

__all__ = [
    "EvalConfig",
    "GenerationConfig",
    "GuardJudge",
    "Judge",
    "REFUSAL_SET",
    "RefusalFilter",
    "XSTEST_REFUSAL_PREFIXES",
    "candidate_log_probs",
    "candidate_log_probs_reference",
    "chat_texts",
    "compliance_rate",
    "defense_success",
    "evaluate",
    "generate",
    "is_refusal",
    "refusal_probability",
    "strmatch_label",
    "write_report",
]
