"""Mixture-of-experts blocks: the authors' router and MoEBERT's hash routing, top-1 routing and sorted dispatch, the
plain-torch MoE FFN and DeepSpeed's MoE layer behind the same router, attention experts, the authors' moefy
initialisation, and the mapping of expert weights between global ids (saved) and an expert-parallel rank's local
ids."""
from __future__ import annotations

import copy
import re

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

from pipeline.models.config import StudentConfig
from pipeline.models.layers import FeedForward, SelfAttention, attend

# "layers.0.ffn.deepspeed_moe.experts.deepspeed_experts.3.fc1.weight" -> prefix, expert id, suffix
EXPERT_KEY = re.compile(r"^(.*\.deepspeed_experts\.)(\d+)(\..*)$")


class Router(nn.Module):
    """The authors' routing gate in plain torch: a biased Linear(H, E) and the training-time noise. DeepSpeed's MoE
    layer takes it through `deepspeed_router`, which adds DeepSpeed's gate interface to these methods."""

    def __init__(self, config: StudentConfig, num_experts: int):
        super().__init__()
        self.init_routing(config, num_experts)

    def init_routing(self, config: StudentConfig, num_experts: int) -> None:
        self.wg = nn.Linear(config.hidden_size, num_experts, bias=config.router_bias)
        self.noisy_gate_policy, self.jitter = config.router_noise, config.router_jitter

    def logits(self, x: torch.Tensor, noisy: bool = True) -> torch.Tensor:
        """(S, H) tokens -> (S, E) fp32 routing logits, with the training-time Jitter / LogitJitter noise
        unless not `noisy`. (The authors add U[1 - eps, 1 + eps]; the constant 1 cancels in the softmax.)"""
        noise = self.noisy_gate_policy if self.training and noisy else None
        x = x.float()
        if noise == "Jitter":  # DeepSpeed's multiplicative_jitter, draw for draw
            x = x * torch.distributions.Uniform(*x.new_tensor([1 - 1e-2, 1 + 1e-2])).rsample(x.shape)
        bias = None if self.wg.bias is None else self.wg.bias.float()
        logits = F.linear(x, self.wg.weight.float(), bias)
        if noise == "LogitJitter":
            logits = logits + torch.empty_like(logits).uniform_(-self.jitter, self.jitter)
        return logits

    def choose(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-1: -> gate probabilities (S, E), chosen expert (S,); RSample picks argmax(logits + Gumbel) (DeepSpeed's
        gumbel_rsample, draw for draw)."""
        probs = logits.softmax(-1)
        if self.training and self.noisy_gate_policy == "RSample":
            gumbel = torch.distributions.Gumbel(*logits.new_tensor([0.0, 1.0]))
            return probs, (logits + gumbel.rsample(logits.shape)).argmax(-1)
        return probs, probs.argmax(-1)

    def route(self, x: torch.Tensor, token_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(S, H) tokens -> gate probabilities (S, E), chosen expert (S,) (the token ids are not used)."""
        return self.choose(self.logits(x))


class HashRouter(nn.Module):
    """MoEBERT's hash-random routing (SimiaoZuo/MoEBERT, `MoELayer`'s "hash-random"): a fixed table of each token
    id's expert, drawn uniformly, one per layer (theirs: each layer's `torch.randint` over the vocabulary; here
    row `layer` of one (layers, vocab) draw from `hash_seed`, so a config gives the same tables every time); gate
    probability 1 for the chosen expert, so its output is not scaled. No parameters: the table is a buffer, saved
    with the weights (theirs is drawn anew at every construction). `k` and `drop_tokens` are the parts of
    DeepSpeed's gate interface that SortedDispatchMoE reads."""

    k, drop_tokens = 1, False

    def __init__(self, config: StudentConfig, num_experts: int, layer: int):
        super().__init__()
        generator = torch.Generator().manual_seed(config.hash_seed)
        tables = torch.randint(num_experts, (config.num_layers, config.vocab_size), generator=generator)
        self.register_buffer("expert_of_token", tables[layer].clone())
        self.num_experts = num_experts

    def route(self, x: torch.Tensor, token_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if token_ids is None:
            raise ValueError("routing 'hash' chooses experts by token id: pass token_ids")
        choice = self.expert_of_token[token_ids]
        return F.one_hot(choice, self.num_experts).float(), choice

    def _set_ep_group(self, group) -> None:  # DeepSpeed's MoE layer hands every gate its expert-parallel group
        self.ep_group = group


def deepspeed_router(config: StudentConfig, num_experts: int) -> nn.Module:
    """The Router as DeepSpeed's TopKGate, so that it plugs into DeepSpeed's MoE layer (capacity-padded dispatch,
    expert parallelism) as well as into the sorted dispatch."""
    from deepspeed.moe.sharded_moe import TopKGate, top1gating, top2gating

    class DeepSpeedRouter(TopKGate):
        init_routing, logits, choose, route = Router.init_routing, Router.logits, Router.choose, Router.route

        def __init__(self):
            super().__init__(config.hidden_size, num_experts, k=config.top_k, capacity_factor=config.capacity_factor,
                             eval_capacity_factor=config.capacity_factor, min_capacity=0,
                             noisy_gate_policy=config.router_noise, drop_tokens=config.drop_tokens,
                             use_rts=config.drop_tokens)
            self.init_routing(config, num_experts)

        def forward(self, input: torch.Tensor, used_token: torch.Tensor | None = None, sparse_routes: bool = False,
                    use_tutel: bool = False):
            """DeepSpeed's TopKGate.forward on our logits (its noise policy is applied in `logits` / by top1gating)."""
            capacity = self.capacity_factor if self.training else self.eval_capacity_factor
            logits = self.logits(input)
            if self.k == 1:
                rsample = "RSample" if self.training and self.noisy_gate_policy == "RSample" else None
                return top1gating(logits, capacity, self.min_capacity, used_token, rsample, self.drop_tokens,
                                  self.use_rts, self.ep_group, sparse_routes, use_tutel)
            return top2gating(logits, capacity, self.min_capacity, self.drop_tokens, self.ep_group,
                              self.top2_2nd_expert_sampling, sparse_routes)

    return DeepSpeedRouter()


def route_top1(gate: nn.Module, x: torch.Tensor, used_token: torch.Tensor | None,
               token_ids: torch.Tensor | None = None):
    """Top-1 routing of tokens x (S, H) (token_ids (S,): their ids, for hash routing) as DeepSpeed's top1gating
    decides it, without capacity padding -> chosen expert (S,), its gate value (S, 1), l_aux, tokens per expert
    (E,) (tokens with used_token 0 uncounted). l_aux is the Switch/GShard balance loss as DeepSpeed computes it:
    E * sum_e mean_s(p_se) * routed_e / S (a constant under hash routing)."""
    probs, choice = gate.route(x, token_ids)
    num_experts = probs.size(1)
    routed = F.one_hot(choice, num_experts)
    if used_token is not None:
        routed = routed * used_token[:, None]
    counts = routed.sum(0)
    l_aux = num_experts * (probs.mean(0) * counts.float() / x.size(0)).sum()
    return choice, probs.gather(1, choice[:, None]), l_aux, counts


class _GatherRows(torch.autograd.Function):
    """x.index_select(0, rows) for distinct rows, whose backward puts each gradient row back with index_copy:
    autograd's own backward, an index_add that allows repeated rows, is ~13x slower on CPU (4096 x 384:
    38.5 ms vs 3.0 ms, BENCHMARKS.md)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(rows)
        ctx.shape = x.shape
        return x.index_select(0, rows)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (rows,) = ctx.saved_tensors
        return grad.new_zeros(ctx.shape).index_copy_(0, rows, grad), None


def sorted_dispatch(moe: nn.Module, hidden_states: torch.Tensor, used_token: torch.Tensor | None,
                    ep_group: "dist.ProcessGroup | None" = None, token_ids: torch.Tensor | None = None):
    """Top-1 MoE FFN, nothing dropped, no capacity padding: `moe.gate` routes (route_top1) and tokens are grouped by
    a stable sort by expert. On one rank each group goes through its expert of `moe.experts.deepspeed_experts`;
    with an expert-parallel group the groups travel to the ranks holding their experts in exact counts
    (`exchange`). -> (output like hidden_states, l_aux, tokens per expert (E,) on this rank)."""
    x = hidden_states.reshape(-1, hidden_states.size(-1))  # (S, H)
    choice, gate_value, l_aux, counts = route_top1(moe.gate, x, used_token, token_ids)
    # Sort tokens by expert; padding (used_token 0) gets the extra id E, sorts last and is left out.
    expert_of = choice if used_token is None else choice.masked_fill(used_token == 0, counts.numel())
    order = torch.sort(expert_of, stable=True)[1][:int(counts.sum())]
    experts, grouped = moe.experts.deepspeed_experts, _GatherRows.apply(x, order)
    out = run_experts(experts, grouped, counts) if ep_group is None else exchange(experts, grouped, counts, ep_group)
    # Back to token order (padding: zeros), scaled by the chosen expert's gate value (in fp32, as DeepSpeed).
    y = out.new_zeros(x.shape).index_copy(0, order, out) * gate_value
    moe.l_aux, moe.exp_counts = l_aux, counts
    return y.to(x.dtype).view_as(hidden_states), l_aux, counts


def run_experts(experts: nn.ModuleList, grouped: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Rows grouped by expert (counts[e] rows for expert e, in order) -> each group through its expert."""
    return torch.cat([expert(chunk) for expert, chunk in zip(experts, grouped.split(counts.tolist()))])


def exchange(experts: nn.ModuleList, grouped: torch.Tensor, counts: torch.Tensor,
             group: "dist.ProcessGroup") -> torch.Tensor:
    """Expert parallelism in exact counts: this rank's tokens, grouped by global expert (counts (E,)), go to the
    ranks holding their experts (rank r holds experts r*L .. r*L+L-1), each rank runs its L experts on what
    arrived and the outputs come back in the order they left. One all-to-all of the counts, then
    all_to_all_single with those split sizes each way, where DeepSpeed's layer pads every expert to the busiest
    one's count."""
    # Differentiable (gradients go back the way the tokens came); waited on at first use.
    from torch.distributed._functional_collectives import all_to_all_single_autograd as all_to_all

    ranks = dist.get_world_size(group)
    arriving = torch.empty_like(counts)  # from rank r for local expert l, at r*L + l
    dist.all_to_all_single(arriving, counts, group=group)
    arriving = arriving.view(ranks, -1)
    send, receive = counts.view(ranks, -1).sum(1).tolist(), arriving.sum(1).tolist()
    arrived = all_to_all(grouped, receive, send, group)
    # Regroup what arrived (by source rank, then expert) by local expert, run the experts, undo the regrouping.
    local_expert = torch.arange(arriving.size(1), device=counts.device).repeat(ranks)
    regroup = torch.sort(local_expert.repeat_interleave(arriving.flatten()), stable=True)[1]
    out = run_experts(experts, _GatherRows.apply(arrived, regroup), arriving.sum(0))
    out = torch.empty_like(out).index_copy(0, regroup, out)
    return all_to_all(out, send, receive, group)


class TorchMoE(nn.Module):
    """The MoE FFN in plain torch, for inference and training in one process without DeepSpeed: top-1 routing
    with sorted dispatch, as DeepSpeed's layer computes it on one rank. Its modules carry the names of DeepSpeed's
    layer (deepspeed_moe.gate, deepspeed_moe.experts.deepspeed_experts.E), so both share one state dict."""

    def __init__(self, config: StudentConfig, num_experts: int, layer: int = 0):
        super().__init__()
        if config.top_k != 1 or config.drop_tokens:
            raise ValueError(f"the plain-torch MoE routes top-1 without dropping tokens (got top_k {config.top_k}, "
                             f"drop_tokens {config.drop_tokens}); build the student with deepspeed_moe=True")
        self.deepspeed_moe = nn.Module()
        self.deepspeed_moe.gate = ffn_router(config, num_experts, layer)
        self.deepspeed_moe.experts = nn.Module()
        expert = FeedForward(config)  # copies, as DeepSpeed's layer makes them (re-initialised by Student)
        self.deepspeed_moe.experts.deepspeed_experts = nn.ModuleList(copy.deepcopy(expert) for _ in range(num_experts))

    def forward(self, hidden_states: torch.Tensor, used_token: torch.Tensor | None = None,
                token_ids: torch.Tensor | None = None):
        return sorted_dispatch(self.deepspeed_moe, hidden_states, used_token, token_ids=token_ids)


def ffn_router(config: StudentConfig, num_experts: int, layer: int, deepspeed_moe: bool = False) -> nn.Module:
    """Layer `layer`'s FFN router of config.routing: HashRouter, or the learned Router (as DeepSpeed's gate with
    `deepspeed_moe`)."""
    if config.routing == "hash":
        return HashRouter(config, num_experts, layer)
    return deepspeed_router(config, num_experts) if deepspeed_moe else Router(config, num_experts)


def moe_feed_forward(config: StudentConfig, num_experts: int | None = None, deepspeed_moe: bool = False,
                     ep_size: int = 1, layer: int = 0) -> nn.Module:
    """`num_experts` (default: the config's) copies of FeedForward (re-initialised by Student) behind layer `layer`'s
    router: the plain-torch TorchMoE, or with `deepspeed_moe` DeepSpeed's classic MoE layer (the engine's training
    path: expert parallelism over `ep_size` ranks, MoE parameter groups, expert checkpoints)."""
    num_experts = num_experts or config.num_experts
    if not deepspeed_moe:
        return TorchMoE(config, num_experts, layer)
    from deepspeed.moe.layer import MoE  # imported here: importing deepspeed costs ~3 s

    class SortedDispatchMoE(MoE):
        """deepspeed.moe.layer.MoE whose top-1, no-drop case takes the sorted dispatch.

        DeepSpeed's dispatch pads every expert to a common capacity (without dropping: the busiest expert's
        count over the expert group) and copies and exchanges tokens through (E, C, H) buffers; the sorted
        dispatch moves exact counts (BENCHMARKS.md, "Models", "Expert parallelism"). The routing, noise, aux
        loss and counts are DeepSpeed's top1gating, step for step; with token dropping or top-2 DeepSpeed's path
        runs."""

        def forward(self, hidden_states: torch.Tensor, used_token: torch.Tensor | None = None,
                    token_ids: torch.Tensor | None = None):
            gate = self.deepspeed_moe.gate
            if gate.drop_tokens or gate.k != 1:
                return super().forward(hidden_states, used_token)
            ep_group = self.deepspeed_moe.ep_group if self.ep_size > 1 else None
            return sorted_dispatch(self.deepspeed_moe, hidden_states, used_token, ep_group, token_ids)

    block = SortedDispatchMoE(config.hidden_size, FeedForward(config), num_experts=num_experts, ep_size=ep_size,
                              k=config.top_k, capacity_factor=config.capacity_factor,
                              eval_capacity_factor=config.capacity_factor, min_capacity=0,
                              drop_tokens=config.drop_tokens, use_rts=config.drop_tokens)
    block.deepspeed_moe.gate = ffn_router(config, num_experts, layer, deepspeed_moe=True)
    return block


class ExpertAttention(nn.Module):
    """`attention_experts` self-attentions routed top-1 per token (the authors' attention experts): a token's
    Q, K, V and output projection are its expert's; attention itself runs over all tokens. Local to each rank
    (not expert-parallel)."""

    def __init__(self, config: StudentConfig):
        super().__init__()
        self.router = Router(config, config.attention_experts)
        self.experts = nn.ModuleList(SelfAttention(config) for _ in range(config.attention_experts))

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor, used_tokens: torch.Tensor):
        """As SelfAttention.forward, with the routing: -> (B, T, H), (q, k, v), (l_aux, counts)."""
        flat = x.reshape(-1, x.size(-1))
        choice, gate_value, l_aux, counts = route_top1(self.router, flat, used_tokens)
        tokens = [(choice == e).nonzero().squeeze(1) for e in range(len(self.experts))]
        q, k, v = (self._per_expert(flat, tokens, [getattr(e, name) for e in self.experts])
                   for name in ("query", "key", "value"))
        first = self.experts[0]
        dropout = first.dropout if self.training else 0.0
        y = attend(*(t.view_as(x) for t in (q, k, v)), key_mask, first.num_heads, dropout)
        out = self._per_expert(y.reshape_as(flat), tokens, [e.output for e in self.experts]) * gate_value
        return out.view_as(x), tuple(t.view_as(x) for t in (q, k, v)), (l_aux, counts)

    @staticmethod
    def _per_expert(x: torch.Tensor, tokens: list[torch.Tensor], linears: list[nn.Module]) -> torch.Tensor:
        out = x.new_empty(x.size(0), linears[0].out_features)
        for index, linear in zip(tokens, linears):
            out.index_copy_(0, index, linear(x.index_select(0, index)))
        return out


def moefy_neurons(num_experts: int, expert_size: int) -> list[torch.Tensor]:
    """The authors' `moefy` cut: which neurons of one wide layer of num_experts x expert_size neurons each
    expert takes: the first 2/3 of expert_size (shared by all experts), then its own neurons, strided
    (e, e + E, e + 2E, ... after the shared block)."""
    shared = expert_size * 2 // 3
    own = torch.arange(expert_size - shared)
    return [torch.cat([torch.arange(shared), shared + e + num_experts * own]) for e in range(num_experts)]


@torch.no_grad()
def moefy_init(experts: list[tuple[list[nn.Linear], list[nn.Linear]]], unit: int, std: float) -> None:
    """Initialise experts as slices of one wide random layer (normal(0, std), zero biases, as BERT's init).

    experts: per expert, (the Linears whose output rows are its units, the Linears whose input columns are),
    e.g. ([fc1], [fc2]) for an FFN expert or ([query, key, value], [output]) for an attention expert; unit:
    the rows/columns of one unit (1 for an FFN neuron, the head size for an attention head)."""
    first_in, first_out = experts[0]
    units = first_in[0].out_features // unit
    cuts = [(neurons[:, None] * unit + torch.arange(unit)).flatten() for neurons in moefy_neurons(len(experts), units)]
    wide = len(experts) * units * unit
    wide_in = [torch.randn(wide, linear.in_features) * std for linear in first_in]
    wide_out = [torch.randn(linear.out_features, wide) * std for linear in first_out]
    for (ins, outs), cut in zip(experts, cuts):
        for linear, weight in zip(ins, wide_in):
            init.copy_(linear.weight, weight[cut])  # (transformers' init functions skip loaded weights)
        for linear, weight in zip(outs, wide_out):
            init.copy_(linear.weight, weight[:, cut])
        for linear in ins + outs:
            init.zeros_(linear.bias)


def check_expert_parallel(config: StudentConfig, deepspeed_moe: bool, ep_size: int) -> None:
    """Expert parallelism needs DeepSpeed's MoE layer and a degree that divides the experts."""
    if ep_size < 1 or config.num_experts % ep_size or (ep_size > 1 and not deepspeed_moe):
        raise ValueError(f"num_experts {config.num_experts} must be >= 1 and a multiple of ep_size {ep_size}, and "
                         f"ep_size > 1 needs deepspeed_moe=True (got ep_size {ep_size}, deepspeed_moe {deepspeed_moe})")


def _expert_parallel_rank(ep_size: int) -> int:
    # DeepSpeed's default layout (use_data_before_expert_parallel_=False): expert groups are
    # consecutive ranks, so the rank inside a group is the global rank modulo ep_size.
    return torch.distributed.get_rank() % ep_size if ep_size > 1 else 0


def localize_experts(state: dict[str, torch.Tensor], num_experts: int, ep_size: int) -> dict[str, torch.Tensor]:
    """Global-id expert weights (as saved) -> this rank's local experts (ids 0..E/ep_size-1)."""
    if ep_size == 1:
        return state
    num_local = num_experts // ep_size
    first = _expert_parallel_rank(ep_size) * num_local
    local = {}
    for key, value in state.items():
        match = EXPERT_KEY.match(key)
        if match is None:
            local[key] = value
        elif first <= int(match[2]) < first + num_local:
            local[f"{match[1]}{int(match[2]) - first}{match[3]}"] = value
    return local


def gather_experts(state: dict[str, torch.Tensor], num_experts: int, ep_size: int) -> dict[str, torch.Tensor]:
    """This rank's local experts -> all experts with global ids (all-gather over the expert group)."""
    if ep_size == 1:
        return state
    from deepspeed.utils import groups

    group = groups._get_expert_parallel_group(f"ep_size_{ep_size}")
    num_local = num_experts // ep_size
    full = {}
    for key, value in state.items():
        match = EXPERT_KEY.match(key)
        if match is None:
            full[key] = value
            continue
        pieces = [torch.empty_like(value) for _ in range(ep_size)]
        torch.distributed.all_gather(pieces, value.contiguous(), group=group)
        for rank, piece in enumerate(pieces):
            full[f"{match[1]}{rank * num_local + int(match[2])}{match[3]}"] = piece
    return full
