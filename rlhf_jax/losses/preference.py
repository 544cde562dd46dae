"""Losses on preference pairs: the reward model's Bradley-Terry loss and the preference-optimisation family.

The family (DPO, cDPO, IPO, SLiC hinge, SimPO, CPO, ORPO, and RPO's NLL term on any of them) is a table,
:data:`PREFERENCE_LOSSES`: each entry is one small per-pair function of the policy's (and, when it needs one,
the reference's) :class:`SequenceLogps` records, with its hyperparameters as keyword numbers, and says whether
it needs a reference. :func:`preference_per_pair` looks the entry up, fills its keywords by name, adds the
NLL term and returns the per-pair losses with metrics that carry their own denominators; a new loss is one
function and one table entry (docs/losses.md shows one).
"""

from __future__ import annotations

import inspect
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from rlhf_jax.losses.aggregation import Weighted, aggregate, metric_values, weighted
from rlhf_jax.losses.masked import as_bool, as_float, masked_mean, safe_divide


def _sanitised_pairs(chosen_rewards, rejected_rewards, margin, pair_mask):
    chosen, rejected = jnp.broadcast_arrays(as_float(chosen_rewards), as_float(rejected_rewards))
    if pair_mask is None:
        pair_mask = jnp.ones(chosen.shape, bool)
    pair_mask = jnp.broadcast_to(as_bool(pair_mask), chosen.shape)
    # Sanitise padded pairs first so neither the value nor the gradient sees what they hold.
    chosen = jnp.where(pair_mask, chosen, 0)
    rejected = jnp.where(pair_mask, rejected, 0)
    margin = jnp.zeros_like(chosen) if margin is None else jnp.where(pair_mask, as_float(margin), 0)
    return chosen, rejected, margin, pair_mask


def _add_centering(preference_loss, centering, center_coef):
    if isinstance(center_coef, (int, float)) and center_coef == 0:
        return preference_loss  # and an overflowing (r_c + r_r)² cannot turn a 0 coefficient into NaN
    return preference_loss + center_coef * centering


def bradley_terry_per_pair(chosen_rewards, rejected_rewards, margin=None, pair_mask=None,
                           center_coef: float = 0.0) -> jnp.ndarray:
    """Per-pair Bradley-Terry loss ``ℓ_b = −log σ(r_c − r_r − m) + center_coef · (r_c + r_r)²``; 0 under the mask.

    For exact accumulation over micro-batches: ``aggregate(ℓ, pair_mask)`` gives ``(Σ_b ℓ_b, #pairs)``, whose
    ratio is :func:`bradley_terry_loss`. Shapes as there; returns [B] float32.
    """
    chosen, rejected, margin, pair_mask = _sanitised_pairs(chosen_rewards, rejected_rewards, margin, pair_mask)
    per_pair = _add_centering(-jax.nn.log_sigmoid(chosen - rejected - margin), jnp.square(chosen + rejected),
                              center_coef)
    return jnp.where(pair_mask, per_pair, 0)


def bradley_terry_loss(chosen_rewards, rejected_rewards, margin=None, pair_mask=None, center_coef: float = 0.0):
    """Bradley-Terry negative log-likelihood of the preferred response, with optional margin and centering.

    ``loss = mean_b[−log σ(r_c − r_r − m)] + center_coef · mean_b[(r_c + r_r)²]``

    The first term is the pairwise preference loss of Ouyang et al. 2022 (InstructGPT); ``m`` is an optional
    per-pair margin (Llama 2, Touvron et al. 2023). The second is the reward-centering auxiliary term of
    Eisenstein et al. 2023, which pins the rewards' mean near 0 (the Bradley-Terry loss only sees
    differences). ``−log σ`` is computed as ``−jax.nn.log_sigmoid`` so differences of ±1e4 stay finite.

    chosen_rewards, rejected_rewards: [B]; margin: [B] or scalar (default 0); pair_mask: [B] bool/{0,1}
    (default: all pairs count). Means are over the pairs in the mask; 0 if there are none.

    Returns ``(loss, metrics)`` with metrics ``rm/loss``, ``rm/accuracy`` (fraction with ``r_c > r_r``; ties
    count as wrong), ``rm/margin`` (mean of ``r_c − r_r``), ``rm/chosen_reward``, ``rm/rejected_reward`` and
    ``rm/centering`` (mean of ``(r_c + r_r)²``, reported whatever ``center_coef``).
    """
    chosen, rejected, margin, pair_mask = _sanitised_pairs(chosen_rewards, rejected_rewards, margin, pair_mask)
    difference = chosen - rejected
    centering = masked_mean(jnp.square(chosen + rejected), pair_mask)
    preference_loss = masked_mean(-jax.nn.log_sigmoid(difference - margin), pair_mask)
    loss = _add_centering(preference_loss, centering, center_coef)
    metrics = {
        "rm/loss": loss,
        "rm/accuracy": masked_mean(chosen > rejected, pair_mask),
        "rm/margin": masked_mean(difference, pair_mask),
        "rm/chosen_reward": masked_mean(chosen, pair_mask),
        "rm/rejected_reward": masked_mean(rejected, pair_mask),
        "rm/centering": centering,
    }
    return loss, metrics


class SequenceLogps(NamedTuple):
    """A response's log-probability as a record: ``total`` = Σ_t log p(y_t | x, y_<t) over its tokens and
    ``count`` = the number of those tokens, both [B]. ``mean()`` is the length-normalised log-prob."""

    total: jnp.ndarray
    count: jnp.ndarray

    def mean(self) -> jnp.ndarray:
        return safe_divide(self.total, self.count)

    def score(self, length_normalised: bool) -> jnp.ndarray:
        return self.mean() if length_normalised else self.total


class PairLogps(NamedTuple):
    """Log-prob records of the chosen and rejected responses of B pairs."""

    chosen: SequenceLogps
    rejected: SequenceLogps


class PairTerms(NamedTuple):
    """What a per-pair loss returns: ``loss`` [B], the implicit rewards of each side [B] (TRL's
    ``rewards/*``), and ``extras``, further per-pair metrics by name."""

    loss: jnp.ndarray
    chosen_rewards: jnp.ndarray
    rejected_rewards: jnp.ndarray
    extras: dict = {}


def _log_ratio_rewards(policy: PairLogps, reference: PairLogps, beta: float):
    """DPO's implicit rewards ``β (log π(y) − log π_ref(y))`` of each side, on summed log-probs (as TRL)."""
    return beta * (policy.chosen.total - reference.chosen.total), beta * (policy.rejected.total -
                                                                          reference.rejected.total)


def _log_ratio_margin(policy: PairLogps, reference: PairLogps, length_normalised: bool):
    """``h = [log π(y_c) − log π_ref(y_c)] − [log π(y_r) − log π_ref(y_r)]``, per token when normalised."""
    return ((policy.chosen.score(length_normalised) - reference.chosen.score(length_normalised))
            - (policy.rejected.score(length_normalised) - reference.rejected.score(length_normalised)))


def _smoothed_logistic(logits, label_smoothing: float):
    """``−(1 − ε) log σ(z) − ε log σ(−z)``: the logistic loss with labels flipped at rate ε (Mitchell 2023)."""
    loss = -(1 - label_smoothing) * jax.nn.log_sigmoid(logits)
    if isinstance(label_smoothing, (int, float)) and label_smoothing == 0:
        return loss
    return loss - label_smoothing * jax.nn.log_sigmoid(-logits)


def sigmoid(policy: PairLogps, reference: PairLogps, beta: float, label_smoothing: float = 0.0,
            length_normalised: bool = False) -> PairTerms:
    """DPO (Rafailov et al. 2023, eq. 7), conservative DPO with ``label_smoothing`` ε (Mitchell 2023):
    ``ℓ = −(1 − ε) log σ(β h) − ε log σ(−β h)`` with ``h`` the log-ratio margin (per token when
    ``length_normalised``: TRL's ``sigmoid_norm``)."""
    margin = _log_ratio_margin(policy, reference, length_normalised)
    return PairTerms(_smoothed_logistic(beta * margin, label_smoothing), *_log_ratio_rewards(policy, reference, beta))


def hinge(policy: PairLogps, reference: PairLogps, beta: float, length_normalised: bool = False) -> PairTerms:
    """SLiC (Zhao et al. 2023): ``ℓ = max(0, 1 − β h)``."""
    margin = _log_ratio_margin(policy, reference, length_normalised)
    return PairTerms(jax.nn.relu(1 - beta * margin), *_log_ratio_rewards(policy, reference, beta))


def ipo(policy: PairLogps, reference: PairLogps, beta: float, length_normalised: bool = False) -> PairTerms:
    """IPO (Azar et al. 2023, eq. 17): ``ℓ = (h − 1/(2β))²``. The paper writes ``h`` on sequence
    log-probs; TRL 1.16 (with the authors' confirmation) uses per-token means: ``length_normalised=True``."""
    margin = _log_ratio_margin(policy, reference, length_normalised)
    return PairTerms(jnp.square(margin - 1 / (2 * beta)), *_log_ratio_rewards(policy, reference, beta))


def simpo(policy: PairLogps, reference: None, beta: float, gamma: float, label_smoothing: float = 0.0) -> PairTerms:
    """SimPO (Meng et al. 2024, eq. 6), reference-free and length-normalised, with target margin γ:
    ``ℓ = −log σ(β (mean log π(y_c) − mean log π(y_r)) − γ)`` (label smoothing as in ``sigmoid``; TRL's
    ``CPOTrainer(loss_type="simpo")`` with ``simpo_gamma = γ``). Rewards: ``β · mean log π(y)``."""
    chosen, rejected = policy.chosen.mean(), policy.rejected.mean()
    return PairTerms(_smoothed_logistic(beta * (chosen - rejected) - gamma, label_smoothing), beta * chosen,
                     beta * rejected)


def cpo(policy: PairLogps, reference: None, beta: float, label_smoothing: float = 0.0) -> PairTerms:
    """CPO's preference term (Xu et al. 2024, eq. 3), DPO without a reference:
    ``ℓ = −log σ(β (log π(y_c) − log π(y_r)))`` on summed log-probs; CPO adds the chosen side's NLL
    (``nll_coef``, 1 by default). Rewards: ``β · log π(y)``."""
    chosen, rejected = policy.chosen.total, policy.rejected.total
    return PairTerms(_smoothed_logistic(beta * (chosen - rejected), label_smoothing), beta * chosen, beta * rejected)


def _log1m_exp(x):
    """``log(1 − exp(x))`` for x < 0, stable at both ends (Mächler 2012)."""
    x = jnp.minimum(x, -1e-7)
    return jnp.where(x > -0.6931471805599453, jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def orpo(policy: PairLogps, reference: None, beta: float) -> PairTerms:
    """ORPO's odds-ratio term (Hong et al. 2024, eqs. 4–7), reference-free: with the per-token means
    ``p = mean log π(y)`` and ``log odds(y) = p − log(1 − exp(p))``,
    ``ℓ = −β log σ(log odds(y_c) − log odds(y_r))``; ORPO adds the chosen side's NLL (``nll_coef``, 1 by
    default), as TRL's ``ORPOTrainer``. Rewards: ``β · mean log π(y)``; extras: the log odds ratio and
    ``log σ`` of it (TRL's ``log_odds_chosen`` and ``log_odds_ratio``)."""
    chosen, rejected = policy.chosen.mean(), policy.rejected.mean()
    log_odds = (chosen - rejected) - (_log1m_exp(chosen) - _log1m_exp(rejected))
    ratio = jax.nn.log_sigmoid(log_odds)
    return PairTerms(-beta * ratio, beta * chosen, beta * rejected,
                     {"log_odds_chosen": log_odds, "log_odds_ratio": ratio})


class PreferenceLossKind(NamedTuple):
    """A table entry: the per-pair function, whether it reads a reference, and the default weight of the chosen
    side's NLL term (``nll_coef=None`` in :func:`preference_per_pair`)."""

    per_pair: Callable[..., PairTerms]
    needs_reference: bool
    nll_coef: float = 0.0


PREFERENCE_LOSSES = {
    "sigmoid": PreferenceLossKind(sigmoid, needs_reference=True),
    "hinge": PreferenceLossKind(hinge, needs_reference=True),
    "ipo": PreferenceLossKind(ipo, needs_reference=True),
    "simpo": PreferenceLossKind(simpo, needs_reference=False),
    "cpo": PreferenceLossKind(cpo, needs_reference=False, nll_coef=1.0),
    "orpo": PreferenceLossKind(orpo, needs_reference=False, nll_coef=1.0),
}

def preference_loss_kind(loss_type: str) -> PreferenceLossKind:
    """The :data:`PREFERENCE_LOSSES` entry of ``loss_type``; ``ValueError`` naming the choices otherwise."""
    if loss_type not in PREFERENCE_LOSSES:
        raise ValueError(f"preference loss {loss_type!r}: expected one of {', '.join(PREFERENCE_LOSSES)}")
    return PREFERENCE_LOSSES[loss_type]


def preference_hyperparameters(loss_type: str) -> tuple[str, ...]:
    """The keyword hyperparameters that ``loss_type``'s per-pair function reads (e.g. ``beta``, ``gamma``)."""
    parameters = inspect.signature(preference_loss_kind(loss_type).per_pair).parameters
    return tuple(name for name in parameters if name not in ("policy", "reference"))


def _sanitised(record: SequenceLogps, pair_mask) -> SequenceLogps:
    # padded pairs are zeroed first so neither the value nor the gradient sees what they hold
    total, count = jnp.broadcast_arrays(as_float(record.total), as_float(record.count))
    return SequenceLogps(jnp.where(pair_mask, total, 0), jnp.where(pair_mask, count, 0))


def preference_per_pair(loss_type: str, policy: PairLogps, reference: PairLogps | None = None, *, pair_mask=None,
                        nll_coef: float | None = None, chosen_tokens_per_pair=None, **hyperparameters):
    """Per-pair preference losses and their metrics: ``(ℓ [B], {name: Weighted})``; ℓ is 0 under the mask.

    ``ℓ_b = per_pair_b + nll_coef · NLL_b`` where ``per_pair`` is ``loss_type``'s entry of
    :data:`PREFERENCE_LOSSES`, called with the ``hyperparameters`` it names (others are ignored), and
    ``NLL_b = −log π(y_c,b) / n̄`` with ``n̄`` the mean number of chosen tokens per pair, so that the mean over
    pairs of the NLL term is the token-mean NLL of the chosen responses (TRL's RPO ``"sft"`` term, CPO's and
    ORPO's NLL). ``nll_coef=None`` takes the entry's default (1 for CPO and ORPO, else 0).

    policy, reference: :class:`PairLogps` of [B] records (reference: None for reference-free losses);
    pair_mask: [B] bool/{0, 1} (default all). chosen_tokens_per_pair: ``n̄`` over the *global* batch when this
    is one micro-batch of it (default: this batch's own), which keeps micro-batching exact.
    ``aggregate(ℓ, pair_mask)`` gives the exact ``(Σ ℓ, #pairs)``. Metrics (TRL's names): ``rewards/chosen``,
    ``rewards/rejected``, ``rewards/accuracies`` (ties count as wrong), ``rewards/margins``, ``logps/chosen``,
    ``logps/rejected`` (summed policy log-probs), ``nll_loss`` when the NLL term is on, and the entry's extras.
    """
    kind = preference_loss_kind(loss_type)
    if kind.needs_reference and reference is None:
        raise ValueError(f"preference loss {loss_type!r} needs the reference's log-probs")
    pair_mask = jnp.ones(jnp.shape(policy.chosen.total), bool) if pair_mask is None else as_bool(pair_mask)
    pair_mask = jnp.broadcast_to(pair_mask, jnp.broadcast_shapes(pair_mask.shape, jnp.shape(policy.chosen.total)))
    policy = PairLogps(*(_sanitised(record, pair_mask) for record in policy))
    if kind.needs_reference:
        reference = PairLogps(*(_sanitised(record, pair_mask) for record in reference))
    else:
        reference = None
    names = preference_hyperparameters(loss_type)
    terms = kind.per_pair(policy, reference, **{name: hyperparameters[name] for name in names
                                                 if name in hyperparameters})
    per_pair = terms.loss
    metrics = {
        "rewards/chosen": weighted(terms.chosen_rewards, pair_mask),
        "rewards/rejected": weighted(terms.rejected_rewards, pair_mask),
        "rewards/accuracies": weighted(terms.chosen_rewards > terms.rejected_rewards, pair_mask),
        "rewards/margins": weighted(terms.chosen_rewards - terms.rejected_rewards, pair_mask),
        "logps/chosen": weighted(policy.chosen.total, pair_mask),
        "logps/rejected": weighted(policy.rejected.total, pair_mask),
        **{name: weighted(values, pair_mask) for name, values in terms.extras.items()},
    }
    nll_coef = kind.nll_coef if nll_coef is None else nll_coef
    if not (isinstance(nll_coef, (int, float)) and nll_coef == 0):
        if chosen_tokens_per_pair is None:
            chosen_tokens_per_pair = safe_divide(jnp.sum(policy.chosen.count), jnp.sum(pair_mask, dtype=jnp.float32))
        per_pair = per_pair + nll_coef * safe_divide(-policy.chosen.total, chosen_tokens_per_pair)
        metrics["nll_loss"] = Weighted(-jnp.sum(policy.chosen.total), jnp.sum(policy.chosen.count))
    return jnp.where(pair_mask, per_pair, 0), metrics


def preference_loss(loss_type: str, policy: PairLogps, reference: PairLogps | None = None, *, pair_mask=None,
                    nll_coef: float | None = None, **hyperparameters):
    """The mean over pairs of :func:`preference_per_pair` (arguments as there): ``(loss, metrics)`` with the
    metrics' values and ``loss`` under its own name; means are over the pairs in the mask, 0 if none.

    For DPO (``"sigmoid"``, Rafailov et al. 2023, eq. 7) at ``π = π_ref`` the loss is ``log 2`` and every
    implicit reward 0.
    """
    per_pair, metrics = preference_per_pair(loss_type, policy, reference, pair_mask=pair_mask, nll_coef=nll_coef,
                                            **hyperparameters)
    loss = Weighted(*aggregate(per_pair, jnp.ones(per_pair.shape, bool) if pair_mask is None else pair_mask))
    return loss.value(), {"loss": loss.value(), **metric_values(metrics)}
