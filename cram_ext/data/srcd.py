"""Sparse retrieval in continuous dynamics (SRCD): an irregularly sampled stream of
noisy observations of damped oscillators, into which a few key-value pairs are written
(store steps) and later asked back (query steps). Some pairs recur across the whole
data set, as in the recurring variant of MQAR.

docs/tasks.md gives the definition; this module is its implementation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .common import IGNORE, key_value_table, keys_outside, uniform_subset

# Event channels, in this order, after the observation channels.
OBSERVE, STORE, QUERY = 0, 1, 2
NUM_EVENTS = 3


@dataclass
class SRCDBatch:
    """One batch of N examples of L steps.

    inputs (N, L, input_dim) float32: [observation (obs_dim) | event one-hot (3: observe,
    store, query) | key one-hot (num_keys; store and query steps) | value one-hot
    (num_values; store steps) | log(dt[t + 1]), the gap to the next step, 0 at the last (1)];
    dt (N, L) float32, the time gap before each step (> 0, also before step 0);
    targets (N, L, obs_dim) float32, the observation of step t + 1 (0 at the last step);
    target_mask (N, L) bool, False at the last step;
    labels (N, L) int64, the queried value at query steps and IGNORE elsewhere;
    recurring (N, L) bool, True at query steps whose key is a recurring (table) key.
    """

    inputs: Tensor
    dt: Tensor
    targets: Tensor
    target_mask: Tensor
    labels: Tensor
    recurring: Tensor

    @property
    def input_dim(self) -> int:
        return self.inputs.shape[-1]

    @property
    def obs_dim(self) -> int:
        return self.targets.shape[-1]


def srcd_input_dim(obs_dim: int, num_keys: int, num_values: int) -> int:
    """Number of input channels: obs_dim + 3 + num_keys + num_values + 1."""
    return obs_dim + NUM_EVENTS + num_keys + num_values + 1


def srcd_observation_input(observation: Tensor, num_keys: int, num_values: int,
                           next_dt: Tensor | float | None = None) -> Tensor:
    """The input of an SRCD observe step that carries `observation` (..., obs_dim): [observation |
    observe one-hot | no key | no value | log of the gap to the next step (0 when next_dt is None,
    as at a sequence's last step)]. What a rollout feeds back of a model's predicted observation
    (`cram_ext.rollout(model, ..., next_input=...)`)."""
    lead, D = observation.shape[:-1], observation.shape[-1]
    x = observation.new_zeros(*lead, srcd_input_dim(D, num_keys, num_values))
    x[..., :D] = observation
    x[..., D + OBSERVE] = 1.0
    if next_dt is not None:
        x[..., -1] = torch.as_tensor(next_dt, dtype=x.dtype, device=x.device).log()
    return x


def srcd_recurring_table(num_keys: int, num_values: int, num_pairs: int, seed: int) -> tuple[Tensor, Tensor]:
    """The data set's fixed key -> value pairs: num_pairs distinct keys in [0, num_keys),
    values in [0, num_values), both int64 of shape (num_pairs,). A pair's rank is its
    position in the table (it sets its weight when recurring_zipf > 0)."""
    if not 0 <= num_pairs <= num_keys:
        raise ValueError(f"num_pairs={num_pairs} recurring pairs need 0 <= num_pairs <= num_keys={num_keys}")
    if num_values < 1:
        raise ValueError(f"num_values={num_values} must be >= 1")
    return key_value_table(num_keys, num_values, num_pairs, seed)


def srcd(
    num_examples: int,
    seq_len: int = 128,
    obs_dim: int = 4,
    num_keys: int = 64,
    num_values: int = 16,
    num_stores: int = 8,
    num_queries: int = 4,
    recurring_frac: float = 0.5,
    num_recurring_pairs: int = 16,
    recurring_zipf: float = 0.0,
    freq_range: tuple[float, float] = (0.5, 3.0),
    damping_range: tuple[float, float] = (0.02, 0.2),
    mean_dt: float = 0.1,
    noise: float = 0.05,
    seed: int = 0,
    table_seed: int = 1234,
) -> SRCDBatch:
    """Generate SRCD examples (the whole batch at once, vectorised).

    Dynamics: obs_dim / 2 independent damped 2-D oscillators per example, angular
    frequency w ~ U(freq_range), damping ratio z ~ U(damping_range), latent state ~ N(0, I)
    at time 0. Over a gap dt each pair is scaled by exp(-z w dt) and rotated by w dt
    (exact, applied from time 0 through the example's cumulative time, so step 0 is
    already one gap dt[:, 0] after the initial state). The observation is Q @ latent,
    Q a random orthogonal matrix per example, plus N(0, noise^2) noise. Gaps:
    dt ~ Exponential(mean mean_dt), clipped to [mean_dt / 10, 5 mean_dt].

    Events: num_stores store steps at distinct uniform positions of [0, L//2) and
    num_queries query steps at distinct uniform positions of [L//2, L). The stored pairs
    have distinct keys: round(recurring_frac * num_stores) recurring pairs drawn without
    replacement from the table of num_recurring_pairs pairs (fixed by table_seed), with
    weights (rank + 1)^(-recurring_zipf), and novel pairs with distinct keys outside the
    table and uniform values; they are stored in random order. Each query asks a
    distinct stored key (chosen uniformly) and is labelled with its value.
    """
    N, L, D = num_examples, seq_len, obs_dim
    half = L // 2
    if L < 2:
        raise ValueError(f"seq_len={seq_len} must be >= 2 (a store half and a query half)")
    if D < 2 or D % 2:
        raise ValueError(f"obs_dim={obs_dim} must be even and >= 2 (pairs of oscillator coordinates)")
    if num_stores < 0 or num_stores > half:
        raise ValueError(f"num_stores={num_stores} store steps must fit in the first half, seq_len // 2 = {half}")
    if num_queries < 0 or num_queries > L - half:
        raise ValueError(
            f"num_queries={num_queries} query steps must fit in the second half, seq_len - seq_len // 2 = {L - half}"
        )
    if num_queries > num_stores:
        raise ValueError(f"num_queries={num_queries} distinct queried keys need num_queries <= num_stores={num_stores}")
    if not 0.0 <= recurring_frac <= 1.0:
        raise ValueError(f"recurring_frac={recurring_frac} must be in [0, 1]")
    if num_values < 1:
        raise ValueError(f"num_values={num_values} must be >= 1")
    if not 0 <= num_recurring_pairs <= num_keys:
        raise ValueError(
            f"num_recurring_pairs={num_recurring_pairs} table keys need 0 <= num_recurring_pairs <= num_keys={num_keys}"
        )
    n_rec = round(recurring_frac * num_stores)
    n_novel = num_stores - n_rec
    if n_rec > num_recurring_pairs:
        raise ValueError(
            f"{n_rec} recurring pairs per example (round(recurring_frac * num_stores)) need "
            f"num_recurring_pairs >= {n_rec}, got {num_recurring_pairs}"
        )
    if n_novel > num_keys - num_recurring_pairs:
        raise ValueError(
            f"{n_novel} novel pairs per example need num_keys - num_recurring_pairs >= {n_novel} keys outside "
            f"the table, got num_keys={num_keys}, num_recurring_pairs={num_recurring_pairs}"
        )
    (w_lo, w_hi), (z_lo, z_hi) = freq_range, damping_range
    if not 0 < w_lo <= w_hi:
        raise ValueError(f"freq_range={freq_range} must satisfy 0 < low <= high")
    if not 0 <= z_lo <= z_hi:
        raise ValueError(f"damping_range={damping_range} must satisfy 0 <= low <= high")
    if not mean_dt > 0:
        raise ValueError(f"mean_dt={mean_dt} must be > 0")
    if not noise >= 0:
        raise ValueError(f"noise={noise} must be >= 0")

    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    P = D // 2

    # --- Dynamics (float64, cast to float32 at the end). ---
    omega = w_lo + (w_hi - w_lo) * torch.rand(N, P, generator=g, dtype=f64)
    zeta = z_lo + (z_hi - z_lo) * torch.rand(N, P, generator=g, dtype=f64)
    z0 = torch.randn(N, P, 2, generator=g, dtype=f64)
    q, r = torch.linalg.qr(torch.randn(N, D, D, generator=g, dtype=f64))
    mix = q * torch.sgn(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)  # Haar-distributed orthogonal
    dt = torch.empty(N, L).exponential_(1.0 / mean_dt, generator=g).clamp_(mean_dt / 10, 5 * mean_dt)
    tau = dt.to(f64).cumsum(dim=1)  # time of each step since the initial state
    angle = omega[:, None, :] * tau[:, :, None]  # (N, L, P)
    decay = torch.exp(-(zeta * omega)[:, None, :] * tau[:, :, None])
    cos, sin = torch.cos(angle), torch.sin(angle)
    x0, y0 = z0[:, None, :, 0], z0[:, None, :, 1]
    latent = torch.stack([decay * (cos * x0 - sin * y0), decay * (sin * x0 + cos * y0)], dim=-1)
    clean = torch.einsum("nij,nlj->nli", mix, latent.reshape(N, L, D))

    # --- Events and key-value pairs. ---
    rows = torch.arange(N)[:, None]
    store_pos = uniform_subset(N, half, num_stores, g).sort(dim=1).values
    query_pos = (uniform_subset(N, L - half, num_queries, g) + half).sort(dim=1).values
    table_keys, table_values = srcd_recurring_table(num_keys, num_values, num_recurring_pairs, table_seed)
    if n_rec > 0:
        weight = (torch.arange(num_recurring_pairs, dtype=f64) + 1) ** (-recurring_zipf)
        pick = torch.multinomial(weight.expand(N, -1), n_rec, replacement=False, generator=g)
    else:
        pick = torch.zeros(N, 0, dtype=torch.long)
    novel_pool = keys_outside(num_keys, table_keys)
    novel_keys = novel_pool[uniform_subset(N, novel_pool.numel(), n_novel, g)]
    novel_values = torch.randint(0, num_values, (N, n_novel), generator=g)
    keys = torch.cat([table_keys[pick], novel_keys], dim=1)
    values = torch.cat([table_values[pick], novel_values], dim=1)
    is_rec = (torch.arange(num_stores) < n_rec).expand(N, -1)
    order = uniform_subset(N, num_stores, num_stores, g)  # which pair each store step holds
    keys, values, is_rec = keys.gather(1, order), values.gather(1, order), is_rec.gather(1, order)
    asked = uniform_subset(N, num_stores, num_queries, g)  # which stored pair each query asks
    q_keys, q_values, q_rec = keys.gather(1, asked), values.gather(1, asked), is_rec.gather(1, asked)

    # Noise last, always drawn, so noise only scales it: the rest of the batch does not depend on noise.
    obs = clean.float() + noise * torch.randn(N, L, D, generator=g)

    # --- Assemble. ---
    ev, kc = D, D + NUM_EVENTS
    vc = kc + num_keys
    inputs = torch.zeros(N, L, srcd_input_dim(D, num_keys, num_values))
    inputs[..., :D] = obs
    inputs[..., ev + OBSERVE] = 1.0
    inputs[rows, store_pos, ev + OBSERVE] = 0.0
    inputs[rows, store_pos, ev + STORE] = 1.0
    inputs[rows, query_pos, ev + OBSERVE] = 0.0
    inputs[rows, query_pos, ev + QUERY] = 1.0
    inputs[rows, store_pos, kc + keys] = 1.0
    inputs[rows, query_pos, kc + q_keys] = 1.0
    inputs[rows, store_pos, vc + values] = 1.0
    # The gap to the next step, so the next observation can be forecast; the gap before
    # a step reaches the model as dt (the working memory's decay).
    inputs[:, :-1, -1] = dt[:, 1:].log()

    targets = torch.zeros(N, L, D)
    targets[:, :-1] = obs[:, 1:]
    target_mask = torch.ones(N, L, dtype=torch.bool)
    target_mask[:, -1] = False
    labels = torch.full((N, L), IGNORE, dtype=torch.long)
    labels[rows, query_pos] = q_values
    recurring = torch.zeros(N, L, dtype=torch.bool)
    recurring[rows, query_pos] = q_rec
    return SRCDBatch(inputs, dt, targets, target_mask, labels, recurring)
