"""The planner: a budget in, candidate shapes, a compute-optimal point and a data-constrained
choice out, each with its arithmetic. Pure: the caller reads runs and writes files.

How the sizes come about (docs/plan.md has the worked example):
- C, the budget in FLOPs = GPU-hours x 3600 x achieved FLOP/s per GPU;
- k = 8 FLOPs per parameter per token with activation recompute, 6 without;
- compute-optimal: Hoffmann et al. 2022 ("Chinchilla"): r tokens per parameter (20), so with
  the model FLOPs 6 N D = C x 6 / k, N_opt = sqrt(C x 6 / k / (6 r)), D_opt = r N_opt.
  (BigScience's 2022 fit, Kaplan-style, suggested 392B on 165B tokens instead: r ~ 0.42;
  --tokens-per-param reproduces it.);
- a shape trains on the tokens the budget affords, D = C / (k N), capped at the data
  ceiling; it is a candidate when D reaches the minimum tokens;
- the data-constrained choice, when the data binds: with D_opt under the minimum tokens, the
  largest candidate that still trains on the minimum (what BigScience did: >= 350B tokens
  pushed 392B down to ~175B); with D_opt over the ceiling, the candidate nearest C / (k x
  ceiling), a larger model on all the data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from pydantic import ValidationError

from bloomrun.plan import arithmetic, memory, rules
from bloomrun.plan.fit import Point, PowerLaw, Prediction, fit_power_law
from bloomrun.trainer.config import ModelConfig, Shape, format_validation_error

DEFAULT_TOKENS_PER_PARAM = 20.0  # Hoffmann et al. 2022
DEFAULT_HEAD_DIMS = (128,)  # BLOOM's (112 heads of 128 for 14336)
DEFAULT_ASPECT = (64.0, 256.0)  # hidden / layers: BLOOM 1b1 64 ... 7b1 137, 176b 205
TIE_FRACTION = 0.02  # shapes within 2% of the best size count as equally close


@dataclass(frozen=True)
class Request:
    gpu_hours: float
    gpu: str
    tflops: float  # achieved per GPU, hardware FLOP/s in the recompute convention below
    cluster: rules.Cluster
    recompute: bool = True
    min_tokens: int | None = None
    max_tokens: int | None = None
    tokens_per_param: float = DEFAULT_TOKENS_PER_PARAM
    # Sequence length, vocabulary and knobs of every candidate: BLOOM-176B's by default.
    model: ModelConfig = field(default_factory=lambda: ModelConfig(preset="176b"))
    head_dims: tuple[int, ...] = DEFAULT_HEAD_DIMS
    hidden_multiple: int = 1024
    aspect: tuple[float, float] = DEFAULT_ASPECT
    size_band: float = 0.25
    shapes: tuple[tuple[int, int, int], ...] = ()  # (layers, hidden, heads) the user asks about
    tp: int | None = None
    pp: int | None = None
    micro_batch: int | None = None

    def __post_init__(self):
        for name in ("gpu_hours", "tflops", "tokens_per_param"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if self.min_tokens is not None and self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens:,}) exceeds max_tokens ({self.max_tokens:,})")
        if self.hidden_multiple % rules.HIDDEN_MULTIPLE:
            raise ValueError(f"hidden_multiple ({self.hidden_multiple}) must be a multiple of 128 (tensor-core tiles)")
        if not 0 < self.aspect[0] <= self.aspect[1]:
            raise ValueError(f"aspect must be 0 < min <= max, got {self.aspect}")
        if not 0 <= self.size_band < 1:
            raise ValueError(f"size_band must be in [0, 1), got {self.size_band}")

    @property
    def flops_per_param_token(self) -> int:
        return (arithmetic.RECOMPUTE_FLOPS_PER_PARAM_TOKEN if self.recompute
                else arithmetic.PLAIN_FLOPS_PER_PARAM_TOKEN)

    @property
    def budget_flops(self) -> float:
        return self.gpu_hours * 3600.0 * self.tflops * 1e12


@dataclass(frozen=True)
class Candidate:
    shape: Shape
    params: int
    tokens: int
    steps: int
    gpu_hours: float
    days: float
    layout: rules.Layout | None  # None: no layout obeys the rules and fits (see problems)
    memory: memory.Memory | None
    bloomrun_memory: memory.Memory  # the layout as bloomrun's trainer runs it: no recompute, PP replicas on FSDP2
    problems: tuple[str, ...] = ()  # why it is not a valid candidate (a --shape may have some)
    prediction: Prediction | None = None  # the fit's loss at 6 N D, when runs were given

    @property
    def label(self) -> str:
        return f"{self.shape.num_layers}x{self.shape.hidden_size}x{self.shape.num_heads}"

    @property
    def model_flops(self) -> float:
        return arithmetic.PLAIN_FLOPS_PER_PARAM_TOKEN * self.params * self.tokens

    @property
    def valid(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class Target:
    """A size the arithmetic names, and the candidate nearest it."""

    kind: str  # "compute-optimal", "data-constrained"
    params: float
    tokens: float
    reason: str
    candidate: Candidate | None


@dataclass(frozen=True)
class Plan:
    request: Request
    candidates: tuple[Candidate, ...]  # valid ones, by size
    asked: tuple[Candidate, ...]  # the user's --shape ones, valid or not
    compute_optimal: Target
    data_constrained: Target | None  # only when the data binds
    largest_at_minimum: Target | None  # whenever a minimum of tokens is given
    chosen: Candidate | None
    fit: PowerLaw | None = None
    runs_points: tuple[Point, ...] = ()  # every checkpoint of the runs given
    throughput_note: str = ""
    arithmetic: tuple[str, ...] = field(default=())

    def targets(self) -> list[Target]:
        return [t for t in (self.compute_optimal, self.data_constrained, self.largest_at_minimum) if t is not None]

    def shown(self) -> list[Candidate]:
        """The table's rows: per hidden size and head width, the layer count nearest each named
        size, plus the named sizes' candidates and the asked shapes; by size."""
        targets = [t.candidate.params for t in self.targets() if t.candidate is not None]
        rows: dict[str, Candidate] = {}
        for target in targets:
            by_width: dict[tuple[int, int], Candidate] = {}
            for c in self.candidates:
                key = (c.shape.hidden_size, c.shape.num_heads)
                if key not in by_width or _distance(c.params, target) < _distance(by_width[key].params, target):
                    by_width[key] = c
            rows.update({c.label: c for c in by_width.values()})
        for c in (*[t.candidate for t in self.targets() if t.candidate is not None], *self.asked):
            rows[c.label] = c
        return sorted(rows.values(), key=lambda c: (c.params, c.shape.num_layers))


# ----------------------------------------------------------------------------- building


@dataclass(frozen=True)
class Sizes:
    """The sizes the arithmetic names before any shape is looked at."""

    n_opt: float  # compute-optimal parameters
    d_opt: float  # and tokens
    n_target: float  # the size that spends the budget on the tokens the data allows
    d_target: float
    largest_at_min: float | None  # the largest size that still trains on min_tokens
    low: float  # the candidates' size window
    high: float


def build_plan(request: Request, points: tuple[Point, ...] = (), throughput_note: str = "") -> Plan:
    """The plan for `request`; with `points` (a study's checkpoints) also the power-law fit of
    loss against compute and each candidate's predicted loss (ValueError if too few points)."""
    fit = fit_power_law(list(points)) if points else None
    named = sizes(request)
    candidates = [c for c in (evaluate(request, shape) for shape in enumerate_shapes(request, named.low, named.high))
                  if c.valid]
    candidates.sort(key=lambda c: (c.params, c.shape.num_layers))
    asked = [evaluate(request, shape, explain=True) for shape in asked_shapes(request)]
    if fit is not None:
        candidates = [with_prediction(c, fit) for c in candidates]
        asked = [with_prediction(c, fit) for c in asked]
    compute_optimal, largest_at_minimum, data_constrained = targets(request, named, candidates)
    # The first valid --shape, else what the data forces, else the compute-optimal size.
    chosen = next((c for c in asked if c.valid), None) or (data_constrained or compute_optimal).candidate
    plan = Plan(request=request, candidates=tuple(candidates), asked=tuple(asked), compute_optimal=compute_optimal,
                data_constrained=data_constrained, largest_at_minimum=largest_at_minimum, chosen=chosen, fit=fit,
                runs_points=tuple(points), throughput_note=throughput_note)
    return replace(plan, arithmetic=tuple(explain(plan)))


def sizes(request: Request) -> Sizes:
    k, budget = request.flops_per_param_token, request.budget_flops
    plain = arithmetic.PLAIN_FLOPS_PER_PARAM_TOKEN
    n_opt = math.sqrt(budget * plain / k / (plain * request.tokens_per_param))  # 6 N (r N) = C x 6 / k
    d_opt = request.tokens_per_param * n_opt
    d_target = d_opt
    if request.min_tokens is not None and d_opt < request.min_tokens:
        d_target = request.min_tokens
    elif request.max_tokens is not None and d_opt > request.max_tokens:
        d_target = request.max_tokens
    n_target = budget / (k * d_target)
    largest_at_min = budget / (k * request.min_tokens) if request.min_tokens else None
    high = max(n_opt, n_target) * (1 + request.size_band)
    if largest_at_min is not None:
        high = max(high, largest_at_min)  # every size that still reaches the minimum tokens
    return Sizes(n_opt=n_opt, d_opt=d_opt, n_target=n_target, d_target=d_target, largest_at_min=largest_at_min,
                 low=min(n_opt, n_target) * (1 - request.size_band), high=high)


def targets(request: Request, named: Sizes,
            candidates: list[Candidate]) -> tuple[Target, Target | None, Target | None]:
    """(compute-optimal, largest at the minimum tokens, data-constrained), each with the
    candidate that stands for it."""
    # Only a candidate near N_opt stands for it: when the data rules N_opt out, none does.
    near_optimal = [c for c in candidates if _distance(c.params, named.n_opt) <= -math.log(1 - request.size_band)]
    compute_optimal = Target("compute-optimal", named.n_opt, named.d_opt,
                             f"{request.tokens_per_param:g} tokens per parameter (Hoffmann et al. 2022)",
                             nearest(near_optimal, named.n_opt))
    largest_at_minimum = None
    if named.largest_at_min is not None:
        reaching = [c for c in candidates if c.params <= named.largest_at_min * (1 + 1e-12)]
        largest_at_minimum = Target("largest-at-minimum", named.largest_at_min, request.min_tokens,
                                    f"the largest model that still trains on the minimum {request.min_tokens:.3g} tokens",
                                    largest_candidate(reaching))
    data_constrained = None
    if request.min_tokens is not None and named.d_opt < request.min_tokens:
        data_constrained = Target("data-constrained", named.largest_at_min, request.min_tokens,
                                  f"compute-optimal tokens {named.d_opt:.3g} < minimum {request.min_tokens:.3g}: "
                                  "the largest model that still trains on the minimum", largest_at_minimum.candidate)
    elif request.max_tokens is not None and named.d_opt > request.max_tokens:
        data_constrained = Target("data-constrained", named.n_target, named.d_target,
                                  f"compute-optimal tokens {named.d_opt:.3g} > data ceiling {request.max_tokens:.3g}: "
                                  "a larger model on all the data", nearest(candidates, named.n_target))
    return compute_optimal, largest_at_minimum, data_constrained


def enumerate_shapes(request: Request, low: float, high: float) -> list[Shape]:
    """Shapes on the hidden grid with a head width from head_dims, hidden / layers within the
    aspect band and parameters within [low, high]; whether a layout exists is evaluate's."""
    base = request.model.shape()
    shapes = []
    hidden = request.hidden_multiple
    while hidden <= 65536:
        # 12 h^2 per block bounds the layers quickly; the exact count decides below.
        min_layers = max(1, math.ceil(hidden / request.aspect[1]))
        max_layers = min(512, math.floor(hidden / request.aspect[0]))
        for layers in range(min_layers, max_layers + 1):
            params = count(request.model, layers, hidden)
            if params > high:
                break
            if params < low:
                continue
            for head_dim in request.head_dims:
                if hidden % head_dim == 0:
                    shapes.append(Shape(num_layers=layers, hidden_size=hidden, num_heads=hidden // head_dim,
                                        seq_length=base.seq_length, vocab_size=base.vocab_size))
        hidden += request.hidden_multiple
    return shapes


def asked_shapes(request: Request) -> list[Shape]:
    base = request.model.shape()
    return [Shape(num_layers=layers, hidden_size=hidden, num_heads=heads, seq_length=base.seq_length,
                  vocab_size=base.vocab_size) for layers, hidden, heads in request.shapes]


def model_config(request: Request, shape: Shape) -> ModelConfig:
    """The request's model section with this shape (the knobs kept)."""
    fields = request.model.model_dump(exclude={"preset", "num_layers", "hidden_size", "num_heads", "seq_length",
                                               "vocab_size"})
    return ModelConfig(preset=None, num_layers=shape.num_layers, hidden_size=shape.hidden_size,
                       num_heads=shape.num_heads, seq_length=shape.seq_length, vocab_size=shape.vocab_size, **fields)


def count(model: ModelConfig, layers: int, hidden: int) -> int:
    """Parameters at (layers, hidden) with `model`'s vocabulary and knobs; heads do not change
    the count, so none is needed (one head keeps the config valid)."""
    fields = model.model_dump(exclude={"preset", "num_layers", "hidden_size", "num_heads"})
    shape = model.shape()
    fields.update(seq_length=shape.seq_length, vocab_size=shape.vocab_size)
    return arithmetic.count_parameters(ModelConfig(preset=None, num_layers=layers, hidden_size=hidden, num_heads=1,
                                                   **fields))


def evaluate(request: Request, shape: Shape, explain: bool = False) -> Candidate:
    """The shape's size, tokens, cost and layout; `problems` says what rules out a shape (in
    detail with `explain`, for the shapes a user asks about)."""
    violations = rules.shape_violations(shape)
    problems = [str(v) for v in violations]
    try:
        model = model_config(request, shape)
    except ValidationError as err:  # the model's own rules, e.g. rotary with an odd head width
        if not any(v.rule is rules.HIDDEN_HEADS for v in violations):  # said already
            problems.append(format_validation_error(err, "model"))
        model = model_config(request, replace(shape, num_heads=1))  # still counts: heads do not change it
    groups = arithmetic.parameter_groups(model)
    tokens, steps, length_problems = run_length(request, shape, groups.total)
    hours = arithmetic.gpu_hours(groups.total, tokens, request.tflops, request.recompute) if tokens else 0.0
    layout, mem = choose_layout(request, shape, groups, model.padded_vocab_size)
    if layout is None:
        problems += (layout_problems(request, shape, groups, model.padded_vocab_size) if explain else ["no layout"])
    # What bloomrun's trainer makes of that layout: no activation recompute, and with tensor or
    # pipeline parallelism, replicas sharded by FSDP2 (pipeline.py, mesh_engine.py), whose
    # fp32 weights and gradients are whole during a step at ZeRO 0-1 (memory.fsdp_states_bytes).
    today = layout or rules.Layout(tp=1, pp=1, dp=request.cluster.num_gpus, micro_batch=1)
    bloomrun_mem = memory.memory_per_gpu(shape, groups, model.padded_vocab_size, today, request.cluster.global_batch,
                                         bloomrun_zero_stage(request, today), recompute=False, gpu=request.gpu,
                                         fsdp=(today.pp > 1 or today.tp > 1) and today.dp > 1)
    return Candidate(shape=shape, params=groups.total, tokens=tokens, steps=steps, gpu_hours=hours,
                     days=hours / request.cluster.num_gpus / 24, layout=layout, memory=mem,
                     bloomrun_memory=bloomrun_mem, problems=tuple(problems + length_problems))


def bloomrun_zero_stage(request: Request, layout: rules.Layout) -> int:
    """The ZeRO stage bloomrun's trainer gives `layout` (parallel.zero_stage): the request's,
    but with a pipeline 1 over dp > 1 replicas, whatever the request's 0 or 1 (FSDP2 shards
    each stage's AdamW moments over them: pipeline.py), and 0 over one replica. Its memory
    is not the ZeRO paper's stage 1: memory.fsdp_states_bytes."""
    if layout.pp > 1:
        return 1 if layout.dp > 1 else 0
    return request.cluster.zero_stage


def run_length(request: Request, shape: Shape, params: int) -> tuple[int, int, list[str]]:
    """(tokens, steps, problems): the tokens the budget affords, C / (k N), capped at the data
    ceiling and rounded down to whole steps."""
    affordable = request.budget_flops / (request.flops_per_param_token * params)
    tokens_per_step = request.cluster.global_batch * shape.seq_length
    steps = int(min(affordable, request.max_tokens or affordable) // tokens_per_step)
    tokens = steps * tokens_per_step
    problems = []
    if request.min_tokens is not None and tokens < request.min_tokens:
        problems.append(f"the budget affords {tokens:,} tokens, under the minimum {request.min_tokens:,}")
    if steps == 0:
        problems.append(f"the budget affords less than one step of {tokens_per_step:,} tokens")
    return tokens, steps, problems


def layout_problems(request: Request, shape: Shape, groups: arithmetic.ParameterGroups,
                    padded_vocab: int) -> list[str]:
    """Why no layout serves: none fits the card (the least memory of those that obey the
    rules), or none obeys the rules (which rules refused how many)."""
    found = rules.layouts(shape, request.cluster, request.tp, request.pp, request.micro_batch)
    if not found:
        return rules.explain_no_layout(shape, request.cluster, request.tp, request.pp, request.micro_batch)
    best = min((memory.memory_per_gpu(shape, groups, padded_vocab, layout, request.cluster.global_batch,
                                      request.cluster.zero_stage, request.recompute, request.gpu)
                for layout in found), key=lambda m: m.total_gib)
    return [f"no layout fits {request.gpu}: the least memory of {len(found)} rule-abiding layouts is "
            f"{best.total_gib:.1f} GiB per GPU, over {memory.MEMORY_HEADROOM:.0%} of {best.capacity_gib:g} GiB"]


def choose_layout(request: Request, shape: Shape, groups: arithmetic.ParameterGroups,
                  padded_vocab: int) -> tuple[rules.Layout | None, memory.Memory | None]:
    """Of the layouts that obey the rules and fit, the least model-parallel one (TP x PP: more
    data parallelism, less communication inside the model), then the smallest pipeline
    bubble (PP - 1) / micro-batches, then the smaller TP."""
    fitting = []
    for layout in rules.layouts(shape, request.cluster, request.tp, request.pp, request.micro_batch):
        mem = memory.memory_per_gpu(shape, groups, padded_vocab, layout, request.cluster.global_batch,
                                    request.cluster.zero_stage, request.recompute, request.gpu)
        if mem.fits:
            bubble = (layout.pp - 1) / layout.micro_batches(request.cluster.global_batch)
            fitting.append(((layout.tp * layout.pp, bubble, layout.tp, -layout.micro_batch), layout, mem))
    if not fitting:
        return None, None
    _key, layout, mem = min(fitting, key=lambda item: item[0])
    return layout, mem


def with_prediction(candidate: Candidate, fit: PowerLaw) -> Candidate:
    if not candidate.tokens:
        return candidate
    return replace(candidate, prediction=fit.predict(candidate.model_flops))


def _distance(params: float, target: float) -> float:
    return abs(math.log(params / target))


def nearest(candidates: list[Candidate], target: float) -> Candidate | None:
    """The candidate nearest `target` in size; of those within TIE_FRACTION of it, the one with
    fewest layers (BigScience's benchmark: 70 x 14336 ran at 150 TFLOP/s, 106 x 12288 at 149.8)."""
    if not candidates:
        return None
    best = min(_distance(c.params, target) for c in candidates)
    close = [c for c in candidates if _distance(c.params, target) <= best + TIE_FRACTION]
    return min(close, key=lambda c: (c.shape.num_layers, _distance(c.params, target)))


def largest_candidate(candidates: list[Candidate]) -> Candidate | None:
    """The largest candidate; of those within TIE_FRACTION of it, the one with fewest layers."""
    if not candidates:
        return None
    top = max(c.params for c in candidates)
    close = [c for c in candidates if c.params >= top * (1 - TIE_FRACTION)]
    return min(close, key=lambda c: (c.shape.num_layers, -c.params))


# ---------------------------------------------------------------------------- arithmetic


def si(count: float) -> str:
    """1.2K, 3.4M, 176.2B, 1.3T: sizes and token counts at a glance."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(count) >= scale:
            return f"{count / scale:,.1f}{suffix}"
    return f"{count:,.0f}"


def explain(plan: Plan) -> list[str]:
    """The arithmetic behind the plan, one line per step, in the paper's terms."""
    r = plan.request
    k = r.flops_per_param_token
    lines = [plan.throughput_note] if plan.throughput_note else []
    lines += [
        f"budget C = {r.gpu_hours:,.0f} GPU-hours x 3600 s x {r.tflops:g} TFLOP/s ({r.gpu}) = {r.budget_flops:.3e} FLOPs",
        f"k = {k} FLOPs per parameter per token ({'with' if r.recompute else 'without'} activation recompute)",
        f"compute-optimal: N = sqrt(C x 6/{k} / (6 x {r.tokens_per_param:g})) = {si(plan.compute_optimal.params)} "
        f"params on D = {r.tokens_per_param:g} N = {si(plan.compute_optimal.tokens)} tokens",
    ]
    if r.min_tokens:
        lines.append(f"largest size that trains on the minimum {si(r.min_tokens)} tokens: "
                     f"C / ({k} x {r.min_tokens:.3e}) = {si(r.budget_flops / (k * r.min_tokens))} params")
    if plan.data_constrained is not None:
        lines.append(f"data-constrained: {plan.data_constrained.reason}")
    chosen = plan.chosen
    if chosen is not None:
        lines += [
            f"chosen: {chosen.shape.num_layers} layers x {chosen.shape.hidden_size} hidden, {chosen.shape.num_heads} "
            f"heads = {chosen.params:,} params",
            f"tokens = C / ({k} x N){f' capped at the ceiling {r.max_tokens:,}' if r.max_tokens else ''}, "
            f"rounded down to whole steps of "
            f"{r.cluster.global_batch} x {chosen.shape.seq_length} = {chosen.tokens:,} ({chosen.steps:,} steps)",
            f"GPU-hours = {k} x {chosen.params:.4e} x {chosen.tokens:.4e} / ({r.tflops:g}e12 x 3600) = "
            f"{chosen.gpu_hours:,.0f}; days on {r.cluster.num_gpus} GPUs = {chosen.gpu_hours:,.0f} / "
            f"{r.cluster.num_gpus} / 24 = {chosen.days:.1f}",
        ]
        megatron = arithmetic.megatron_flops_per_token(model_config(r, chosen.shape), r.recompute)
        lines.append(f"check: Megatron's 24 x {4 if r.recompute else 3} x l h^2 (1 + s/6h + V/16lh) = "
                     f"{megatron:.4e} FLOPs per token, {megatron / (k * chosen.params) - 1:+.1%} against "
                     f"{k} N = {k * chosen.params:.4e} (attention's scores counted, the embedding lookup not)")
        if chosen.layout is not None:
            lines.append(f"layout {chosen.layout}: {chosen.memory.total_gib:.1f} GiB per GPU under ZeRO "
                         f"{r.cluster.zero_stage} of {chosen.memory.capacity_gib:g} GiB")
    if plan.fit is not None:
        lines.append(f"fit: {plan.fit.describe()}")
        if chosen is not None and chosen.prediction is not None:
            p = chosen.prediction
            lines.append(f"predicted loss of the chosen model at 6 N D = {p.compute:.3e} FLOPs: {p.loss:.4g} "
                         f"(95% prediction interval {p.low:.4g} - {p.high:.4g})")
            fitted = max(point.compute for point in plan.fit.points)
            lines.append(f"that is {math.log10(p.compute / fitted):.1f} orders of magnitude beyond the largest fitted "
                         f"point ({fitted:.3e} FLOPs): the interval counts the points' scatter, not whether the law "
                         "holds that far")
    return lines
