"""Naive MoE reference: per-token Python loops, written from the definitions, sharing no code with dist_moe.

`naive_moe` routes one token at a time (fp32 softmax router, as specified), decides drops by walking the
assignments in priority order with a per-expert counter, and sums the chosen experts' SwiGLU outputs in
the input dtype (use float64).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def naive_route(probs: torch.Tensor, k: int):
    """Per token: the k experts in decreasing probability."""
    return [sorted(range(len(p)), key=lambda e: -float(p[e]))[:k] for p in probs]


def naive_keep(choices, probs, num_experts: int, capacity, policy: str):
    """kept[t][r] by walking assignments in priority order; capacity None keeps everything."""
    num_tokens, k = len(choices), len(choices[0])
    if policy == "position":  # all first choices (token order), then all second choices, ...
        walk = [(t, r) for r in range(k) for t in range(num_tokens)]
    else:  # highest router probability first
        walk = sorted(((t, r) for t in range(num_tokens) for r in range(k)),
                      key=lambda a: -float(probs[a[0], choices[a[0]][a[1]]]))
    used = [0] * num_experts
    kept = [[False] * k for _ in range(num_tokens)]
    for t, r in walk:
        e = choices[t][r]
        if capacity is None or used[e] < capacity:
            kept[t][r] = True
            used[e] += 1
    return kept


def swiglu(x, w1, w3, w2):
    return (F.silu(x @ w1) * (x @ w3)) @ w2


def naive_moe(x, router_weight, w1, w3, w2, k, capacity, policy="position", normalize=True, shared=None):
    """x (T, D); router_weight (E, D); w1, w3 (E, D, F); w2 (E, F, D). Returns (y (T, D), kept, aux, z)."""
    logits = x.float() @ router_weight.float().t()
    probs = torch.softmax(logits, dim=-1)
    num_experts = router_weight.shape[0]
    choices = naive_route(probs.detach(), k)
    kept = naive_keep(choices, probs.detach(), num_experts, capacity, policy)
    rows = []
    for t in range(x.shape[0]):
        gates = [probs[t, e] if kept[t][r] else probs[t, e] * 0 for r, e in enumerate(choices[t])]
        if normalize and k > 1:
            total = sum(gates)
            gates = [g / torch.clamp(total, min=torch.finfo(torch.float32).eps) for g in gates]
        y = x[t] * 0
        for r, e in enumerate(choices[t]):
            if kept[t][r]:
                y = y + gates[r].to(x.dtype) * swiglu(x[t], w1[e], w3[e], w2[e])
        if shared is not None:
            y = y + swiglu(x[t], *shared)
        rows.append(y)
    first = [c[:1] if k <= 2 else c for c in choices]
    f = torch.zeros(num_experts)
    for c in first:
        for e in c:
            f[e] += 1.0 / (len(first) * len(c))
    aux = num_experts * sum(f[e] * probs[:, e].mean() for e in range(num_experts))
    z = sum(torch.logsumexp(logits[t], 0) ** 2 for t in range(x.shape[0])) / x.shape[0]
    return torch.stack(rows), kept, aux, z


# ---------------------------------------------------------------------------------------- routing policies


def naive_scores(logits: torch.Tensor, score: str):
    """(probabilities per token for the aux loss and the stats, scores the weights come from)."""
    if score == "softmax":
        probs = torch.softmax(logits, dim=-1)
        return probs, probs
    sig = torch.sigmoid(logits)
    return sig / sig.sum(-1, keepdim=True), sig


def naive_gates(scores: torch.Tensor, choices, score: str) -> torch.Tensor:
    """(T, E): the gate each token's chosen experts get (0 elsewhere). softmax: the probability itself;
    sigmoid: the score over the sum of the token's chosen scores (DeepSeek-V3; a single choice gets 1)."""
    gates = torch.zeros_like(scores)
    for t, row in enumerate(choices):
        total = sum(float(scores[t, e]) for e in row) if score == "sigmoid" else 1.0
        for e in row:
            gates[t, e] = scores[t, e] / total
    return gates


def naive_token_choice(scores, selection, k: int, score: str, capacity: int, policy: str, overflow: str, tries: int):
    """Token choice as docs/routing.md defines it: each token picks its k best by selection; capacity keeps
    assignments in priority order (probs: by gate); reroute moves the overflowing ones (requests ranked by
    the score the token gives the requested expert) and then the same capacity decision, on the final choices
    with their final gates, decides what drops. Returns (final choices, gates (T, E), kept, rerouted, first
    choices)."""
    num_experts = scores.shape[1]
    first = naive_route(selection, k)
    gates = naive_gates(scores, first, score)
    kept = naive_keep(first, gates, num_experts, capacity, policy)
    if overflow == "drop":
        return first, gates, kept, [[False] * k for _ in first], first
    choices, _, rerouted = naive_reroute(selection, first, kept, capacity, tries, policy, lambda t, e: scores[t, e])
    gates = naive_gates(scores, choices, score)
    return choices, gates, naive_keep(choices, gates, num_experts, capacity, policy), rerouted, first


def naive_reroute(selection, choices, kept, capacity: int, tries: int, policy: str, weight_of):
    """Rounds of: every token's i-th still-overflowing choice asks for the i-th best expert (by selection,
    ties to the lower id) that the token does not use and that has room at the start of the round; experts
    grant in priority order (position: choice, then token; probs: higher weight_of(t, e) first)."""
    num_tokens, num_experts = selection.shape
    k = len(choices[0])
    experts = [list(c) for c in choices]
    kept = [list(row) for row in kept]
    rerouted = [[False] * k for _ in range(num_tokens)]
    load = [0] * num_experts
    for t in range(num_tokens):
        for r in range(k):
            load[experts[t][r]] += kept[t][r]
    prefs = [sorted(range(num_experts), key=lambda e: (-float(selection[t, e]), e)) for t in range(num_tokens)]
    for _ in range(tries):
        room = [capacity - load[e] for e in range(num_experts)]
        asks = []
        for t in range(num_tokens):
            free = [e for e in prefs[t] if e not in experts[t] and room[e] > 0]
            for i, r in enumerate(r for r in range(k) if not kept[t][r]):
                if i < len(free):
                    asks.append((t, r, free[i]))
        asks.sort(key=lambda a: (a[1], a[0]))  # choice-major
        if policy == "probs":
            asks.sort(key=lambda a: -float(weight_of(a[0], a[2])))  # stable: ties keep the choice-major order
        for t, r, e in asks:
            if room[e] > 0:
                room[e] -= 1
                load[e] += 1
                experts[t][r], kept[t][r], rerouted[t][r] = e, True, True
    return experts, kept, rerouted


def naive_expert_choice(selection, capacity: int):
    """Per expert: its `capacity` tokens of highest selection (ties to the lower token id)."""
    num_tokens, num_experts = selection.shape
    capacity = min(capacity, num_tokens)
    return [sorted(range(num_tokens), key=lambda t: (-float(selection[t, e]), t))[:capacity]
            for e in range(num_experts)]


def naive_combine(x, assignments, w1, w3, w2):
    """y[t] = sum over (expert e, gate g) in assignments[t] of g * SwiGLU_e(x[t])."""
    return torch.stack([sum((g.to(x.dtype) * swiglu(x[t], w1[e], w3[e], w2[e]) for e, g in assignments[t]),
                            x[t] * 0) for t in range(x.shape[0])])


def naive_switch_loss(probs, choices, num_experts: int):
    """E * sum_e f_e P_e; f over first choices (k <= 2) or all choices (k >= 3), as in naive_moe."""
    counted = [c[:1] if len(c) <= 2 else c for c in choices]
    f = [sum(c.count(e) for c in counted) / sum(len(c) for c in counted) for e in range(num_experts)]
    return num_experts * sum(f[e] * probs[:, e].mean() for e in range(num_experts))
