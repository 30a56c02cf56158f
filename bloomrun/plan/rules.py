"""BLOOM's shape rules and the parallel layouts that obey them (../shared/PAPER.md).

BigScience chose the 176B shape under these rules, each for a kernel or a pipeline reason;
a shape that breaks one is not wrong as mathematics, but runs slower or not at all in
Megatron-DeepSpeed's 3-D parallel layout (tensor x pipeline x data), which they used.
Everything here is pure: a shape and a layout in, the broken rules out.
"""

from __future__ import annotations

from dataclasses import dataclass

from bloomrun.trainer.config import Shape

HIDDEN_MULTIPLE = 128  # tensor-core tiles
SOFTMAX_MULTIPLE = 4  # Megatron's fused (scaled, masked) softmax kernel
EMBEDDING_STAGES = 2  # the pipeline's embedding and LM-head stages count as layers


@dataclass(frozen=True)
class Rule:
    name: str
    statement: str
    why: str


HIDDEN_TILES = Rule("hidden-tiles", "hidden divisible by 128", "tensor-core tiles")
HIDDEN_HEADS = Rule("hidden-heads", "hidden divisible by heads", "every head has the same width")
HIDDEN_TP = Rule("hidden-tp", "hidden divisible by TP", "tensor parallelism splits the hidden size")
FUSED_SOFTMAX = Rule("fused-softmax", "(heads / TP) x micro-batch divisible by 4",
                     "Megatron's fused softmax kernel; heads must also split evenly over TP")
PIPELINE_STAGES = Rule("pipeline-stages", "layers + 2 divisible by PP",
                       "the embedding stages count as two layers in the pipeline's split")
TP_IN_NODE = Rule("tp-in-node", "TP within one node (TP <= GPUs per node)",
                  "tensor parallelism needs NVLink bandwidth, not the network's")
GPU_COUNT = Rule("gpu-count", "TP x PP divides the GPU count", "DP = GPUs / (TP x PP) must be whole")
GLOBAL_BATCH = Rule("global-batch", "global batch divisible by micro-batch x DP",
                    "every data-parallel rank runs the same whole number of micro-batches")
WHOLE_NODES = Rule("whole-nodes", "TP x PP divides the GPUs per node or is a multiple of them",
                   "a node holds whole pipeline replicas (bloomrun's placement: scaling adds whole replicas)")
ZERO_PIPELINE = Rule("zero-pipeline", "ZeRO stage 2 or 3 only without pipeline parallelism (PP 1)",
                     "DeepSpeed's pipeline engine supports ZeRO stage 0 and 1 only")

RULES = (HIDDEN_TILES, HIDDEN_HEADS, HIDDEN_TP, FUSED_SOFTMAX, PIPELINE_STAGES, TP_IN_NODE, WHOLE_NODES, GPU_COUNT,
         GLOBAL_BATCH, ZERO_PIPELINE)


@dataclass(frozen=True)
class Violation:
    rule: Rule
    detail: str

    def __str__(self) -> str:
        return f"{self.rule.statement} ({self.rule.why}): {self.detail}"


@dataclass(frozen=True)
class Cluster:
    """What the layout must fit: the GPUs, how they sit in nodes, and the batch."""

    num_gpus: int
    gpus_per_node: int = 8
    global_batch: int = 2048  # sequences; BLOOM's
    zero_stage: int = 1  # BLOOM's


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    micro_batch: int

    def __str__(self) -> str:
        return f"TP{self.tp} PP{self.pp} DP{self.dp} mb{self.micro_batch}"

    def micro_batches(self, global_batch: int) -> int:
        """Micro-batches each data-parallel rank runs per step (the pipeline's depth of work)."""
        return global_batch // (self.micro_batch * self.dp)


def shape_violations(shape: Shape) -> list[Violation]:
    """The rules a shape breaks whatever the layout."""
    found = []
    if shape.hidden_size % HIDDEN_MULTIPLE:
        found.append(Violation(HIDDEN_TILES, f"hidden {shape.hidden_size} = {shape.hidden_size // HIDDEN_MULTIPLE} "
                                             f"x 128 + {shape.hidden_size % HIDDEN_MULTIPLE}"))
    if shape.hidden_size % shape.num_heads:
        found.append(Violation(HIDDEN_HEADS, f"hidden {shape.hidden_size} / {shape.num_heads} heads is not whole"))
    return found


def layout_violations(shape: Shape, layout: Layout, cluster: Cluster) -> list[Violation]:
    """The rules a shape breaks in this layout on this cluster."""
    found = []
    if shape.hidden_size % layout.tp:
        found.append(Violation(HIDDEN_TP, f"hidden {shape.hidden_size} / TP {layout.tp} is not whole"))
    if shape.num_heads % layout.tp:
        found.append(Violation(FUSED_SOFTMAX, f"{shape.num_heads} heads do not split over TP {layout.tp}"))
    elif (shape.num_heads // layout.tp * layout.micro_batch) % SOFTMAX_MULTIPLE:
        found.append(Violation(FUSED_SOFTMAX, f"({shape.num_heads} / {layout.tp}) x {layout.micro_batch} = "
                                              f"{shape.num_heads // layout.tp * layout.micro_batch}"))
    if (shape.num_layers + EMBEDDING_STAGES) % layout.pp:
        found.append(Violation(PIPELINE_STAGES, f"{shape.num_layers} + 2 = {shape.num_layers + EMBEDDING_STAGES} "
                                                f"is not divisible by PP {layout.pp}"))
    if layout.tp > cluster.gpus_per_node:
        found.append(Violation(TP_IN_NODE, f"TP {layout.tp} > {cluster.gpus_per_node} GPUs per node"))
    replica, per_node = layout.tp * layout.pp, cluster.gpus_per_node
    if (per_node % replica) if replica <= per_node else (replica % per_node):
        found.append(Violation(WHOLE_NODES, f"TP {layout.tp} x PP {layout.pp} = {replica} with {per_node} GPUs "
                                            "per node"))
    if layout.tp * layout.pp * layout.dp != cluster.num_gpus:
        found.append(Violation(GPU_COUNT, f"TP {layout.tp} x PP {layout.pp} x DP {layout.dp} = "
                                          f"{layout.tp * layout.pp * layout.dp}, not the {cluster.num_gpus} GPUs"))
    if cluster.global_batch % (layout.micro_batch * layout.dp):
        found.append(Violation(GLOBAL_BATCH, f"{cluster.global_batch} / ({layout.micro_batch} x {layout.dp}) "
                                             "is not whole"))
    if cluster.zero_stage >= 2 and layout.pp > 1:
        found.append(Violation(ZERO_PIPELINE, f"ZeRO stage {cluster.zero_stage} with PP {layout.pp}"))
    return found


def layouts(shape: Shape, cluster: Cluster, tp: int | None = None, pp: int | None = None,
            micro_batch: int | None = None) -> list[Layout]:
    """Every layout that obeys the rules for `shape` on `cluster`; tp, pp, micro_batch pin one
    choice each. TP and micro-batch are powers of two up to a node and 8 (Megatron's practice)."""
    tps = [tp] if tp else [t for t in (1, 2, 4, 8, 16) if t <= cluster.gpus_per_node]
    micro_batches = [micro_batch] if micro_batch else [1, 2, 4, 8]
    found = []
    for t in tps:
        if cluster.num_gpus % t:
            continue
        pps = [pp] if pp else [p for p in divisors(cluster.num_gpus // t) if p <= shape.num_layers]
        for p in pps:
            if cluster.num_gpus % (t * p):
                continue
            for mb in micro_batches:
                layout = Layout(tp=t, pp=p, dp=cluster.num_gpus // (t * p), micro_batch=mb)
                if not layout_violations(shape, layout, cluster):
                    found.append(layout)
    return found


def explain_no_layout(shape: Shape, cluster: Cluster, tp: int | None = None, pp: int | None = None,
                      micro_batch: int | None = None) -> list[str]:
    """Why no layout obeys the rules: each rule with how many of the tried layouts it refused,
    and one example of each."""
    tps = [tp] if tp else [t for t in (1, 2, 4, 8, 16) if t <= cluster.gpus_per_node] or [1]
    # The pipeline depths worth naming: those that divide the GPUs and those that split the layers.
    pps = [pp] if pp else sorted(p for p in set(divisors(cluster.num_gpus)) | set(divisors(shape.num_layers + 2))
                                 if p <= shape.num_layers)
    micro_batches = [micro_batch] if micro_batch else [1, 2, 4, 8]
    counts: dict[str, tuple[int, Violation]] = {}
    for t in tps:
        for p in pps:
            for mb in micro_batches:
                layout = Layout(tp=t, pp=p, dp=max(1, cluster.num_gpus // (t * p)), micro_batch=mb)
                for violation in layout_violations(shape, layout, cluster):
                    count, example = counts.get(violation.rule.name, (0, violation))
                    counts[violation.rule.name] = (count + 1, example)
    tried = len(tps) * len(pps) * len(micro_batches)
    return [f"{example.rule.statement} ({example.rule.why}) refuses {count} of {tried} layouts, e.g. {example.detail}"
            for count, example in sorted(counts.values(), key=lambda item: -item[0])]


def divisors(n: int) -> list[int]:
    small = [d for d in range(1, int(n**0.5) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))
