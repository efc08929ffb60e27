"""Shared pieces of the graph passes: refusal bookkeeping, constant checks, the fixpoint pipeline.

Passes work on `onnx_ir.Model` and follow onnx-ir's shape: a class with
`call(model) -> PassResult(model, modified)`. A fusion refuses rather than guesses; every refusal
is logged at DEBUG and kept on the pass (`.refusals`) so a summary can say why a node survived.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes import PassError, PassResult

log = logging.getLogger(__name__)

__all__ = ["Refusal", "Fired", "QPass", "const_array", "check_owned_constant", "sole_consumer",
           "run_to_fixpoint", "PipelineResult", "to_ir", "to_proto", "PassResult"]


@dataclass(frozen=True)
class Refusal:
    pass_name: str
    node: str
    reason: str

    def __str__(self) -> str:
        return f"{self.pass_name}: {self.node}: {self.reason}"


@dataclass(frozen=True)
class Fired:
    pass_name: str
    what: str

    def __str__(self) -> str:
        return f"{self.pass_name}: {self.what}"


class QPass(ir.passes.InPlacePass):
    """In-place pass that records what it fused and why it refused."""

    def __init__(self) -> None:
        super().__init__()
        self.refusals: list[Refusal] = []
        self.fired: list[Fired] = []

    @property
    def name(self) -> str:
        return type(self).__name__

    def refuse(self, node: ir.Node, reason: str) -> None:
        r = Refusal(self.name, node.name or node.op_type, reason)
        log.debug("%s", r)
        self.refusals.append(r)

    def fire(self, what: str) -> None:
        log.debug("%s: %s", self.name, what)
        self.fired.append(Fired(self.name, what))


def const_array(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


def check_owned_constant(value: ir.Value | None, allowed_users: Iterable[ir.Node]) -> str | None:
    """Why `value` cannot be rewritten in place (None when it can).

    Rewriting a weight is only safe when it is a constant initializer that no graph input can
    override and that nobody outside the match reads.
    """
    if value is None:
        return "missing input"
    if value.is_graph_input():
        return f"{value.name!r} is a graph input"
    if not value.is_initializer() or value.const_value is None:
        return f"{value.name!r} is not a constant initializer"
    allowed = set(allowed_users)
    for user, _ in value.uses():
        if user not in allowed:
            return f"{value.name!r} is shared with {user.name or user.op_type!r} outside the match"
    return None


def sole_consumer(value: ir.Value) -> ir.Node | None:
    """The only node reading `value`, or None when it has several readers or is a graph output."""
    if value.is_graph_output():
        return None
    users = value.consumers()
    if len(users) != 1:
        return None
    node = users[0]
    # A node reading the same value twice (x*x) is not a plain chain.
    if sum(1 for v in node.inputs if v is value) != 1:
        return None
    return node


def new_initializer(graph: ir.Graph, array: np.ndarray, name: str, taken: set[str] | None = None) -> ir.Value:
    """Register a fresh initializer, suffixing the name until it is unique in the graph.
    `taken`: the graph's names, kept by a caller that adds many (each call would rescan the graph)."""
    name = unique_name(graph, name, taken)
    v = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                 const_value=ir.tensor(array, name=name))
    graph.register_initializer(v)
    return v


def names_in(graph: ir.Graph) -> set[str]:
    """Every value name of the graph (initializers, inputs, node outputs)."""
    names = set(graph.initializers)
    names.update(v.name for v in graph.inputs if v.name)
    for node in graph:
        names.update(v.name for v in node.outputs if v.name)
    return names


def unique_name(graph: ir.Graph, name: str, taken: set[str] | None = None) -> str:
    """`name`, suffixed until no value of the graph has it; added to `taken` when given (see new_initializer)."""
    names = names_in(graph) if taken is None else taken
    base, k = name, 0
    while name in names:
        k += 1
        name = f"{base}_{k}"
    if taken is not None:
        taken.add(name)
    return name


def replace_value(old: ir.Value, new: ir.Value) -> None:
    """Point every reader of `old` at `new`; a graph output keeps its public name."""
    if old.is_graph_output():
        name = old.name
        old.name = None  # free the name first: names are unique per graph
        old.replace_all_uses_with(new, replace_graph_outputs=True)
        new.name = name
    else:
        old.replace_all_uses_with(new)


@dataclass
class PipelineResult:
    model: ir.Model
    modified: bool
    iterations: int
    refusals: list[Refusal]
    fired: list[Fired]


def run_to_fixpoint(model: ir.Model, passes: Sequence[ir.passes.PassBase], max_iterations: int = 8) -> PipelineResult:
    """Run `passes` in order, again and again, until one round changes nothing (at most `max_iterations`).

    A failing pass is named in the raised PassError, with the original error as its cause.
    Refusals repeat every round, so they are de-duplicated and kept from the last round only:
    a refusal that a later fusion resolved does not linger in the report.
    """
    modified_any = False
    fired: list[Fired] = []
    refusals: list[Refusal] = []
    it = 0
    for it in range(1, max_iterations + 1):
        round_modified = False
        refusals = []
        for p in passes:
            if isinstance(p, QPass):
                p.refusals.clear()
                p.fired.clear()
            try:
                result = p(model)
            except Exception as e:
                raise PassError(f"pass {type(p).__name__} failed in round {it}: {e}") from e
            model = result.model
            round_modified |= result.modified
            if isinstance(p, QPass):
                fired.extend(p.fired)
                refusals.extend(r for r in p.refusals if r not in refusals)
        modified_any |= round_modified
        if not round_modified:
            break
    else:
        log.warning("pass pipeline still changing the graph after %d rounds; stopped", max_iterations)
    return PipelineResult(model, modified_any, it, refusals, fired)


def to_ir(model: onnx.ModelProto) -> ir.Model:
    """A private ir.Model: onnx_ir wraps the proto's tensors lazily, and renaming an initializer
    renames the proto it came from, so the caller's proto is copied first."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return ir.serde.deserialize_model(copy)


def to_proto(model: ir.Model) -> onnx.ModelProto:
    return ir.serde.serialize_model(model)
