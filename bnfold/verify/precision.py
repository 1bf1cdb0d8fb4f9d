"""The float precision a model computes each value in, for the check's default tolerances.

A model converted to float16 usually keeps float32 inputs and outputs (onnxconverter-common's
``keep_io_types=True``): Cast nodes take the data to float16, the weights are float16, and a last
Cast brings the result back to float32. Its outputs are declared float32 but carry float16
rounding, about 1e-3 of their scale, so a float32 tolerance refuses every correct fold of it.

Rule: a value's precision is the lowest float precision among the values it is computed from,
itself included: graph inputs, initializers and Constant nodes, Cast targets, and types declared
in ``value_info`` or on graph outputs. "Lowest" counts mantissa bits: float64 > float32 >
float16 > bfloat16 > float8 types. Integer and bool values carry no float precision (a shape
computed from a float16 tensor does not make anything float16). An op with subgraphs (If, Loop,
Scan) takes the lowest precision found anywhere inside them. Each result says why, naming the
value that set it.
"""

from __future__ import annotations

from typing import Dict, Iterable, Optional, Tuple

# float type -> mantissa bits (the order of precision)
MANTISSA_BITS: Dict[str, int] = {
    "float64": 52,
    "float32": 23,
    "float16": 10,
    "bfloat16": 7,
    "float8e4m3fn": 3,
    "float8e4m3fnuz": 3,
    "float8e5m2": 2,
    "float8e5m2fnuz": 2,
    "float4e2m1": 1,
}

Precision = Tuple[str, str]  # (float type, why)


def float_name(elem_type: int) -> Optional[str]:
    """The float type name of an ONNX element type, None for non-float types."""
    import onnx

    name = onnx.TensorProto.DataType.Name(elem_type).lower() if elem_type else ""
    name = {"float": "float32", "double": "float64"}.get(name, name)
    return name if name in MANTISSA_BITS else None


def _lower(a: Optional[Precision], b: Optional[Precision]) -> Optional[Precision]:
    if a is None:
        return b
    if b is None:
        return a
    return b if MANTISSA_BITS[b[0]] < MANTISSA_BITS[a[0]] else a


def value_precisions(model) -> Dict[str, Precision]:
    """``{value name: (float type, why)}`` for every float value of the main graph."""
    graph = model.graph
    declared: Dict[str, Precision] = {}
    for vi, what in [(v, "input") for v in graph.input] + [(v, "value_info") for v in graph.value_info] + [
        (v, "output") for v in graph.output
    ]:
        if vi.type.WhichOneof("value") == "tensor_type":
            name = float_name(vi.type.tensor_type.elem_type)
            if name:
                declared[vi.name] = (name, f"{what} '{vi.name}' is {name}")
    for t in graph.initializer:
        name = float_name(t.data_type)
        if name:
            declared[t.name] = (name, f"initializer '{t.name}' is {name}")
    known: Dict[str, Precision] = {n: p for n, p in declared.items() if n in {i.name for i in graph.input} or n in {t.name for t in graph.initializer}}
    for node in graph.node:
        inherited: Optional[Precision] = None
        for name in node.input:
            if name:
                inherited = _lower(inherited, known.get(name))
        inherited = _lower(inherited, _own_precision(node))
        for out in node.output:
            if not out:
                continue
            mine = declared.get(out)
            if node.op_type == "Cast" and mine is None:
                mine = _cast_target(node, out)
            if mine is None and not _outputs_float(node, out, declared, inherited):
                continue
            if node.op_type in ("Shape", "Size", "NonZero", "ArgMax", "ArgMin") and mine is None:
                continue  # integer results: no float precision flows through them
            known[out] = _lower(inherited, mine) if (mine is not None or inherited is not None) else None
            if known[out] is None:
                del known[out]
    return known


def _own_precision(node) -> Optional[Precision]:
    """Constants a node carries: a Constant's value, a Cast target, tensors inside subgraphs."""
    from onnx import AttributeProto

    found: Optional[Precision] = None
    for attr in node.attribute:
        if attr.type == AttributeProto.TENSOR:
            name = float_name(attr.t.data_type)
            if name:
                found = _lower(found, (name, f"{node.op_type} '{_label(node)}' holds a {name} constant"))
        elif attr.type == AttributeProto.GRAPH:
            found = _lower(found, _graph_lowest(attr.g))
        elif attr.type == AttributeProto.GRAPHS:
            for g in attr.graphs:
                found = _lower(found, _graph_lowest(g))
    return found


def _graph_lowest(graph) -> Optional[Precision]:
    found: Optional[Precision] = None
    for t in graph.initializer:
        name = float_name(t.data_type)
        if name:
            found = _lower(found, (name, f"initializer '{t.name}' in subgraph '{graph.name}' is {name}"))
    for vi in list(graph.value_info) + list(graph.output) + list(graph.input):
        if vi.type.WhichOneof("value") == "tensor_type":
            name = float_name(vi.type.tensor_type.elem_type)
            if name:
                found = _lower(found, (name, f"'{vi.name}' in subgraph '{graph.name}' is {name}"))
    for node in graph.node:
        found = _lower(found, _own_precision(node))
        if node.op_type == "Cast" and node.output:
            found = _lower(found, _cast_target(node, node.output[0]))
    return found


def _cast_target(node, out) -> Optional[Precision]:
    to = next((a.i for a in node.attribute if a.name == "to"), 0)
    name = float_name(to)
    return (name, f"Cast '{_label(node)}' converts to {name}") if name else None


def _outputs_float(node, out, declared, inherited) -> bool:
    """Whether ``out`` may be a float value: declared float, or an op that passes floats on."""
    if out in declared:
        return True
    if node.op_type == "Cast":
        return False  # a Cast to a non-float type
    return inherited is not None


def _label(node) -> str:
    return node.name or f"{node.op_type}({node.output[0] if node.output else ''})"


def lowest(precisions: Iterable[Optional[Precision]]) -> Optional[Precision]:
    found: Optional[Precision] = None
    for p in precisions:
        found = _lower(found, p)
    return found
