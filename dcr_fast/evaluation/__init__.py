"""Evaluation of the DCR pipeline: generation, refusal judging, refusal probability,
layer separability, refusal tracking during SFT, and Table-1 style reports."""

from dcr_fast.evaluation.harness import EvalConfig, evaluate
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
from dcr_fast.evaluation.separability import kmeans_hungarian_accuracy, last_token_hidden_states, plot_mds, separability
from dcr_fast.evaluation.tracking import RefusalTracker, plot_tracking

__all__ = [
    "EvalConfig",
    "GenerationConfig",
    "GuardJudge",
    "Judge",
    "REFUSAL_SET",
    "RefusalFilter",
    "RefusalTracker",
    "XSTEST_REFUSAL_PREFIXES",
    "candidate_log_probs",
    "candidate_log_probs_reference",
    "chat_texts",
    "compliance_rate",
    "defense_success",
    "evaluate",
    "generate",
    "is_refusal",
    "kmeans_hungarian_accuracy",
    "last_token_hidden_states",
    "plot_mds",
    "plot_tracking",
    "refusal_probability",
    "separability",
    "strmatch_label",
    "write_report",
]
