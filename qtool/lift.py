"""Lift an ONNX graph into a trainable torch.nn.Module (the bridge QAT trains through).

The per-op torch implementations live in `qtool.lift_ops` (the op registry); this module is the
graph container that runs them.

`lift(model)` returns a `LiftedModule` that runs the graph's nodes in topological order with torch
ops: one precomputed list of steps, each a module-level function plus its parsed attributes, over
a dict of tensors by ONNX name. Nothing is renamed: weights stay keyed by initializer name, so
`export_weights()` / `write_back(model)` put fine-tuned values straight back into the same graph.

State:
- float initializers that are weights/biases of Conv, ConvTranspose, Gemm, MatMul, the
  scale/bias of Batch/Layer/Instance/GroupNormalization, PRelu slopes and Gather tables
  (embeddings) become nn.Parameters; BN running mean/var and everything else
  (reshape targets, Add/Mul constants, int tensors) become buffers. BN in train mode uses batch
  statistics and updates its running stats in place, like torch (momentum = 1 - ONNX momentum).
- `Identity(initializer)` outputs are untied into tensors of their own: torch.onnx.export
  deduplicates equal-valued initializers (a fresh model's BN weights and running vars all alias
  one tensor), and training them tied would be wrong. `write_back` gives an alias whose value
  diverged from its source a new initializer `<alias>.lifted` feeding the same Identity node.
- Constant nodes are evaluated once at lift time (non-persistent buffers, so `.to()` moves them).

Quantization hooks: `set_quantizer(tensor_name, fq)` applies `fq` where that tensor's value is
produced (graph input, node output or initializer); `set_weight_quantizer(init_name, fq)` does
the same for a weight, after reading the parameter. One hook per tensor = one QDQ pair per tensor,
which is how the exporter places them; a module standing in for nodes (`replace_nodes`) may hold
slots inside and declares them. `to_plan(points)` reads every slot back as a QuantPlan.

Limits (raise QtoolError naming op and node at lift time): ops outside `qtool.lift_ops.supported_ops()`
(non-default domains such as com.microsoft included), BatchNormalization with training outputs in use,
MaxPool's Indices output, ConvTranspose with auto_pad SAME_*/output_shape, Resize with antialias,
ScatterND with mul/max/min reduction.

Inputs: `forward(*positional, **named)`, positional in graph-input order (initializer-backed inputs
excluded), any dtype the graph takes (int64 ids and masks included); gradients flow through the float
paths (the integer ones — Shape, Gather indices, masks — carry none).
"""
from __future__ import annotations

import copy
import re
from collections import defaultdict
from typing import Callable

import numpy as np
import onnx
import torch
import torch.nn as nn
from onnx import numpy_helper

from qtool.errors import QtoolError
from qtool.io import MAX_OPSET, MIN_OPSET, default_opset
from qtool.lift_ops import Unsupported, call_module, constant_value, op_entry

__all__ = ["lift", "LiftedModule"]

_PARAM_INPUTS = {  # op -> input indices whose float initializers are trainable
    "Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (0, 1, 2), "MatMul": (0, 1),
    "BatchNormalization": (1, 2), "LayerNormalization": (1, 2), "InstanceNormalization": (1, 2),
    "GroupNormalization": (1, 2), "Gather": (0,), "PRelu": (1,),  # Gather: an embedding table
}
_BN_RUNNING_INPUTS = (3, 4)


def _label(node: onnx.NodeProto) -> str:
    return repr(node.name) if node.name else f"(unnamed, output {node.output[0]!r})"


def _sanitize(name: str, taken: set[str], prefix: str) -> str:
    base = prefix + re.sub(r"\W", "_", name)
    key, i = base, 1
    while key in taken:
        key, i = f"{base}_{i}", i + 1
    taken.add(key)
    return key


def _topological(nodes: list[onnx.NodeProto], available: set[str]) -> list[onnx.NodeProto]:
    """Kahn's algorithm keeping the file order among ready nodes (ONNX files are usually sorted)."""
    producers = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    deps = [{producers[t] for t in n.input if t and t not in available and t in producers} for n in nodes]
    users = defaultdict(list)
    for i, d in enumerate(deps):
        for j in d:
            users[j].append(i)
    pending = [len(d) for d in deps]
    ready = [i for i, p in enumerate(pending) if p == 0]
    order = []
    while ready:
        i = min(ready)
        ready.remove(i)
        order.append(nodes[i])
        for u in users[i]:
            pending[u] -= 1
            if pending[u] == 0:
                ready.append(u)
    if len(order) != len(nodes):
        stuck = next(n for n, p in zip(nodes, pending) if p)
        raise QtoolError(f"graph has a cycle at node {stuck.name!r} ({stuck.op_type})")
    return order


class LiftedModule(nn.Module):
    """An ONNX graph as a torch module; see the module docstring. Build it with `lift(model)`."""

    def __init__(self, model: onnx.ModelProto):
        super().__init__()
        graph = model.graph
        opset = default_opset(model)
        if not MIN_OPSET <= opset <= MAX_OPSET:
            raise QtoolError(f"lift supports opsets {MIN_OPSET}..{MAX_OPSET}, model has {opset}")
        for imp in model.opset_import:
            if imp.domain not in ("", "ai.onnx"):
                used = [n for n in graph.node if n.domain == imp.domain]
                if used:
                    raise QtoolError(f"unsupported op {imp.domain}::{used[0].op_type} in node {_label(used[0])}")

        self.opset = opset
        inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        self._init_dtypes = {t.name: t.data_type for t in graph.initializer}
        self.input_names = [i.name for i in graph.input if i.name not in inits]
        self.output_names = [o.name for o in graph.output]

        # Constants and Identity(initializer) aliases are resolved here, not at run time.
        consts: dict[str, np.ndarray] = {}
        self._alias_source: dict[str, str] = {}  # alias tensor -> initializer it was copied from
        compute: list[onnx.NodeProto] = []
        state_names = set(inits)
        for node in _topological(list(graph.node), set(inits) | set(self.input_names)):
            if node.domain not in ("", "ai.onnx"):
                raise QtoolError(f"unsupported op {node.domain}::{node.op_type} in node {_label(node)}")
            if node.op_type == "Constant":
                try:
                    consts[node.output[0]] = constant_value(node)
                except Unsupported as e:
                    raise QtoolError(f"unsupported Constant node {_label(node)}: {e}") from None
            elif node.op_type == "Identity" and node.input[0] in state_names:
                src = node.input[0]
                self._alias_source[node.output[0]] = self._alias_source.get(src, src)
                state_names.add(node.output[0])
                inits[node.output[0]] = inits[src]
            else:
                compute.append(node)

        # Role of each state tensor from its consumers.
        roles: dict[str, set[str]] = defaultdict(set)
        running_users: dict[str, list[str]] = defaultdict(list)
        for node in compute:
            for i, t in enumerate(node.input):
                if t not in state_names:
                    continue
                if i in _PARAM_INPUTS.get(node.op_type, ()):
                    roles[t].add("param")
                elif node.op_type == "BatchNormalization" and i in _BN_RUNNING_INPUTS:
                    roles[t].add("running")
                    running_users[t].append(node.name)
                else:
                    roles[t].add("buffer")
        for t, r in roles.items():
            if "param" in r and "running" in r:
                raise QtoolError(f"initializer {t!r} is both a trainable weight and a BatchNormalization running "
                                 "statistic; untie it (give each use its own initializer) before lifting")
            if len(running_users[t]) > 1:
                raise QtoolError(f"BatchNormalization running statistic {t!r} is shared by nodes "
                                 f"{running_users[t]}; untie it before lifting")

        self.params = nn.ParameterDict()
        self.state = nn.Module()  # buffers (persistent: they are written back)
        self.consts = nn.Module()  # evaluated Constant nodes (not written back)
        self.quantizers = nn.ModuleDict()
        self.replaced = nn.ModuleDict()  # modules standing in for groups of nodes (replace_nodes)
        taken: set[str] = set()
        self._state_key: dict[str, tuple[str, str]] = {}  # tensor name -> ("param"|"buffer", key)
        for name in sorted(state_names):
            arr = np.array(inits[name], copy=True)
            try:
                t = torch.from_numpy(arr)
            except TypeError:
                raise QtoolError(f"initializer {name!r} has dtype {arr.dtype}, which torch cannot hold") from None
            key = _sanitize(name, taken, "")
            if "param" in roles.get(name, ()) and t.is_floating_point():
                self.params[key] = nn.Parameter(t)
                self._state_key[name] = ("param", key)
            else:
                self.state.register_buffer(key, t)
                self._state_key[name] = ("buffer", key)
        self._const_key: dict[str, str] = {}
        for name, arr in consts.items():
            key = _sanitize(name, taken, "c_")
            self.consts.register_buffer(key, torch.from_numpy(np.array(arr, copy=True)), persistent=False)
            self._const_key[name] = key

        self._steps: list[tuple[Callable, dict, tuple[str, ...], tuple[str, ...]]] = []
        for node in compute:
            entry = op_entry(node.op_type)
            if entry is None:
                raise QtoolError(f"unsupported op {node.op_type} in node {_label(node)}")
            run, parse = entry
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            attrs["_onnx_attrs"] = dict(attrs)  # as in the file (qtool.ortexact rebuilds some nodes for onnxruntime)
            attrs["_n_outputs"] = len(node.output)
            if parse is not None:
                try:
                    attrs = parse(attrs, node)
                except Unsupported as e:
                    raise QtoolError(f"unsupported {node.op_type} in node {_label(node)}: {e}") from None
            ins = tuple(node.input)
            while ins and not ins[-1]:  # trailing optional inputs left out
                ins = ins[:-1]
            self._steps.append((run, attrs, ins, tuple(node.output)))
        self._node_names = [n.name for n in compute]
        self._op_types = [n.op_type for n in compute]
        self.eval_overrides = nn.ModuleDict()  # output tensor -> module run instead of the op in eval mode
        self._override_key: dict[str, str] = {}
        self._override_taken: set[str] = set()

        self._tensor_names = set(self.input_names) | state_names | set(consts) | {o for n in compute for o in n.output}
        for o in self.output_names:
            if o not in self._tensor_names:
                raise QtoolError(f"graph output {o!r} is produced by no node")
        self._quant_key: dict[str, str] = {}
        self._quant_taken: set[str] = set()
        self._inner_slots: dict[str, nn.Module] = {}  # slots inside replace_nodes modules (owned there)

    # -- state -----------------------------------------------------------------------------------
    def tensor(self, name: str) -> torch.Tensor:
        """The Parameter or buffer holding initializer (or Identity alias) `name`."""
        try:
            kind, key = self._state_key[name]
        except KeyError:
            raise QtoolError(f"no initializer named {name!r} in the lifted graph") from None
        return self.params[key] if kind == "param" else self.state._buffers[key]

    def constant(self, name: str) -> torch.Tensor | None:
        """The value of initializer / alias / Constant-node output `name`; None for a computed tensor."""
        if name in self._state_key:
            return self.tensor(name)
        key = self._const_key.get(name)
        return None if key is None else self.consts._buffers[key]

    def trainable_initializers(self) -> dict[str, nn.Parameter]:
        """Initializer name -> Parameter (the parameter <-> initializer mapping)."""
        return {n: self.params[k] for n, (kind, k) in self._state_key.items() if kind == "param"}

    def initializer_for(self, param: torch.Tensor) -> str:
        for n, (kind, k) in self._state_key.items():
            if kind == "param" and self.params[k] is param:
                return n
        raise KeyError("tensor is not a lifted initializer parameter")

    def export_weights(self) -> dict[str, np.ndarray]:
        """Every initializer (params and buffers, incl. BN running stats), keyed by its ONNX name,
        in the initializer's dtype; untied Identity aliases appear under the Identity's output."""
        out = {}
        for name in self._state_key:
            arr = self.tensor(name).detach().cpu().numpy()
            dt = self._init_dtypes.get(self._alias_source.get(name, name))
            if dt is not None:
                arr = arr.astype(onnx.helper.tensor_dtype_to_np_dtype(dt), copy=False)
            out[name] = np.array(arr, copy=True)
        return out

    def write_back(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """A copy of `model` with this module's weights in its initializers; node names unchanged."""
        weights = self.export_weights()
        out = copy.deepcopy(model)
        by_name = {t.name: t for t in out.graph.initializer}
        for name, arr in weights.items():
            if name in self._alias_source:
                continue
            t = by_name.get(name)
            if t is None:
                raise QtoolError(f"initializer {name!r} not found: write_back needs the graph that was lifted")
            if tuple(t.dims) != arr.shape:
                raise QtoolError(f"initializer {name!r} has shape {tuple(t.dims)} in the model, {arr.shape} here")
            t.CopyFrom(numpy_helper.from_array(arr, name))
        taken = {t.name for t in out.graph.initializer} | {o for n in out.graph.node for o in n.output}
        for alias, src in self._alias_source.items():
            if np.array_equal(weights[alias], weights[src]):
                continue
            node = next((n for n in out.graph.node if n.op_type == "Identity" and n.output[0] == alias), None)
            if node is None:
                raise QtoolError(f"Identity node producing {alias!r} not found: write_back needs the lifted graph")
            new_name = _unique(alias + ".lifted", taken)
            out.graph.initializer.append(numpy_helper.from_array(weights[alias], new_name))
            node.input[0] = new_name
        return out

    def node_attrs(self, node_name: str) -> dict:
        """Parsed attributes of a node still run as a step (for `qtool.lift_ops.run_op`)."""
        for name, (_, attrs, _, _) in zip(self._node_names, self._steps):
            if name == node_name:
                return dict(attrs)
        raise QtoolError(f"no node named {node_name!r} in the lifted graph")

    def replace_nodes(self, node_names: list[str], module: nn.Module, inputs: list[str], outputs: list[str],
                      quantizes: dict[str, nn.Module] | None = None) -> None:
        """Run `module(*inputs) -> outputs` in place of the named nodes (QAT trains Conv+BN this way).

        The module runs where the last of the nodes ran; the other nodes' outputs must be read by
        nothing outside the group (the caller checks the pattern). `quantizes`: the quantizer slots
        the module applies inside, by the fused graph's tensor name (a folded Conv->BN weight, the
        dynamic trainer's K weight options); `to_plan` reads them like the lifted module's own.
        """
        wanted = list(dict.fromkeys(node_names))
        idx = [i for i, n in enumerate(self._node_names) if n in wanted]
        if len(idx) != len(wanted):
            missing = [n for n in wanted if n not in self._node_names]
            raise QtoolError(f"replace_nodes: nodes {missing} are not steps of the lifted graph")
        for t in inputs:
            if t and t not in self._tensor_names:
                raise QtoolError(f"replace_nodes: no tensor named {t!r}")
        key = _sanitize(wanted[-1], set(self.replaced.keys()), "r_")
        self.replaced[key] = module
        step = (call_module, {"module": module}, tuple(inputs), tuple(outputs))
        drop = set(idx[:-1])
        self._steps = [step if i == idx[-1] else s for i, s in enumerate(self._steps) if i not in drop]
        self._node_names = [key if i == idx[-1] else n for i, n in enumerate(self._node_names) if i not in drop]
        self._op_types = ["Replaced" if i == idx[-1] else n for i, n in enumerate(self._op_types) if i not in drop]
        self._tensor_names |= set(outputs)
        self._inner_slots.update(quantizes or {})

    def step_table(self) -> list[tuple[str, dict, tuple[str, ...], tuple[str, ...]]]:
        """(op_type, attrs, inputs, outputs) per step in run order; "Replaced" for replace_nodes groups."""
        return [(op, attrs, ins, outs) for op, (_, attrs, ins, outs) in zip(self._op_types, self._steps)]

    def set_eval_override(self, output_name: str, module: nn.Module | None) -> None:
        """In eval mode, compute the step producing `output_name` as `module(*inputs)` (None removes it);
        qtool.ortexact uses this to run quantized ops the way onnxruntime's integer kernels do."""
        if not any(outs and outs[0] == output_name for _, _, _, outs in self._steps):
            raise QtoolError(f"no step produces {output_name!r} in the lifted graph")
        _set_keyed(self.eval_overrides, self._override_key, self._override_taken, output_name, module, "e_")

    # -- quantization hooks ----------------------------------------------------------------------
    def set_quantizer(self, tensor_name: str, module: nn.Module | None) -> None:
        """Apply `module` to tensor `tensor_name` where it is produced (None removes the hook)."""
        if tensor_name not in self._tensor_names:
            raise QtoolError(f"no tensor named {tensor_name!r} in the lifted graph")
        _set_keyed(self.quantizers, self._quant_key, self._quant_taken, tensor_name, module, "q_")

    def set_weight_quantizer(self, initializer_name: str, module: nn.Module | None) -> None:
        if initializer_name not in self._state_key:
            raise QtoolError(f"no initializer named {initializer_name!r} in the lifted graph")
        self.set_quantizer(initializer_name, module)

    def quantizer(self, tensor_name: str) -> nn.Module | None:
        key = self._quant_key.get(tensor_name)
        return None if key is None else self.quantizers[key]

    def quantized_tensors(self) -> dict[str, nn.Module]:
        return {n: self.quantizers[k] for n, k in self._quant_key.items()}

    def to_plan(self, points, meta: dict | None = None, names: dict[str, str] | None = None):
        """The QuantPlan of this module's quantizer slots: one entry per weight / activation point of
        `points` (a `qtool.quant_points.QuantPoints` of the fused graph) whose tensor holds a slot
        (its own, or one a `replace_nodes` module declared), or whose root does (a pass-through output
        takes its root's parameters), from the slot's active single-bit quantizer
        (`qtool.quant_slots.plan_of`). Biases take no entry (their scale is s_in * s_w). `names`: fused
        tensor -> the tensor of this module, where it lifted another graph (qat's unfolded Conv->BN,
        `qtool.bn_strategy.unfold_map`)."""
        from qtool.quant_slots import plan_of

        def slot(t: str) -> nn.Module | None:
            q = self._inner_slots.get(t)
            return q if q is not None else self.quantizer(names.get(t, t) if names else t)

        slots = {}
        for p in points:
            if p.kind not in ("weight", "activation"):
                continue
            q = slot(p.tensor)
            if q is None and p.kind == "activation":
                q = slot(p.root)
            if q is not None:
                slots[p.tensor] = (p.kind, q)
        return plan_of(slots, meta)

    # -- execution -------------------------------------------------------------------------------
    def forward(self, *args: torch.Tensor, **named: torch.Tensor):
        env = self.values(*args, **named)
        result = tuple(env[o] for o in self.output_names)
        return result[0] if len(result) == 1 else result

    def values(self, *args: torch.Tensor, **named: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every tensor of one forward run, by name (each through its quantizer, as the next step reads it)."""
        if len(args) > len(self.input_names):
            raise QtoolError(f"model takes {len(self.input_names)} inputs, got {len(args)}")
        feeds = dict(zip(self.input_names, args))
        feeds.update(named)
        missing = [n for n in self.input_names if n not in feeds]
        unknown = [n for n in named if n not in self.input_names]
        if missing or unknown:
            raise QtoolError(f"model inputs are {self.input_names}; missing {missing}, unknown {unknown}")
        qk, qmods = self._quant_key, self.quantizers
        env: dict[str, torch.Tensor] = {}
        for name, (kind, key) in self._state_key.items():
            env[name] = self.params[key] if kind == "param" else self.state._buffers[key]
        for name, key in self._const_key.items():
            env[name] = self.consts._buffers[key]
        env.update(feeds)
        for name, key in qk.items():
            if name in env:
                env[name] = qmods[key](env[name])
        return self.run_steps(env)

    def run_steps(self, env: dict[str, torch.Tensor], start: int = 0, stop: int | None = None) -> dict:
        """Run steps `start:stop` (step_table order) over `env` (tensor name -> value, updated in place
        and returned), each output through its quantizer: a part of the graph, as forward runs it
        (block-wise reconstruction, qtool.brecq, runs one block at a time this way)."""
        qk, qmods = self._quant_key, self.quantizers
        training = self.training
        overrides = {} if training else self._override_key
        for run, attrs, ins, outs in self._steps[start:stop]:
            ov = overrides.get(outs[0]) if overrides else None
            if ov is not None:
                y = self.eval_overrides[ov](*[env[t] if t else None for t in ins])
            else:
                y = run(attrs, training, *[env[t] if t else None for t in ins])
            if isinstance(y, tuple):
                for o, v in zip(outs, y):
                    env[o] = v
            else:
                env[outs[0]] = y
            if qk:
                for o in outs:
                    key = qk.get(o)
                    if key is not None:
                        env[o] = qmods[key](env[o])
        return env


def _set_keyed(store: nn.ModuleDict, keys: dict[str, str], taken: set[str], name: str, module: nn.Module | None,
               prefix: str) -> None:
    """Put `module` in `store` under tensor `name` (a sanitized key); None removes it."""
    key = keys.get(name)
    if module is None:
        if key is not None:
            del store[key]
            del keys[name]
        return
    if key is None:
        key = keys[name] = _sanitize(name, taken, prefix)
    store[key] = module


def _unique(name: str, taken: set[str]) -> str:
    new, i = name, 1
    while new in taken:
        new, i = f"{name}{i}", i + 1
    taken.add(new)
    return new


def lift(model: onnx.ModelProto) -> LiftedModule:
    """Lift an ONNX model (opset 13..22, default domain) into a trainable `LiftedModule`."""
    return LiftedModule(model)
