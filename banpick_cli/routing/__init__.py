"""The one routing core: pure torch functions from router logits [T, E] to a Routing. No model, no I/O.

Every function takes the router's logits for a batch of tokens and a RouterSpec (the model's own
rule) and returns Routing(indices [T, W], weights [T, W], k [T]); a slot holding index == E is
"no expert" with weight 0, which transformers' eager experts loop skips. Readings of the paper's
ambiguous rules, and the options that offer the alternatives: docs/routing.md.

    RouterSpec, Routing           the model's rule; the result
    probs, select_scores          scores [T, E]; the scores the router chooses by
    route                         the model's own routing, with another k or banned experts (kl-scan)
    weights_for, keep_top         the model's weight rule on any set; keep each token's top k_i
    pick                          Pick strategies A-E (section 4.3)
    token_ratio, ban_k, ban       Ban (section 5): R per token, K per token, the routing
    ban_rule                      one layer's Ban, its knobs checked and its constants taken once
    ban_pick, ban_pick_rule       Ban then Pick C (section 6.1); one layer's, checked once
    fixed_k                       Fixed-K: the model's own top-k with a smaller k (the rival of per-token pruning)
    batch_share, distinct_experts batch-aware step after any rule: fewer distinct experts per batch
    dynamic_k, dynamic            top-p dynamic routing (appendix E)
    des_bounds, des_ratios, des_thresholds, des, odp, rice
                                  DES, ODP and RICE (appendix E)
"""

from .ban import BETA, K_MIN, LAM, ban, ban_k, ban_rule, check_ban_params, token_ratio
from .banpick import ban_pick, ban_pick_rule
from .baselines import des, des_bounds, des_ratios, des_thresholds, dynamic, dynamic_k, odp, rice
from .batch import ANCHOR, batch_share, default_candidates, distinct_experts
from .fixed_k import fixed_k
from .pick import STRATEGIES, pick
from .spec import RouterSpec, Routing
from .topk import keep_top, probs, route, select_scores, weights_for

__all__ = [
    "ANCHOR",
    "BETA",
    "K_MIN",
    "LAM",
    "STRATEGIES",
    "RouterSpec",
    "Routing",
    "ban",
    "ban_k",
    "ban_pick",
    "ban_pick_rule",
    "ban_rule",
    "batch_share",
    "check_ban_params",
    "default_candidates",
    "des",
    "des_bounds",
    "des_ratios",
    "des_thresholds",
    "distinct_experts",
    "dynamic",
    "dynamic_k",
    "fixed_k",
    "keep_top",
    "odp",
    "pick",
    "probs",
    "rice",
    "route",
    "select_scores",
    "token_ratio",
    "weights_for",
]
