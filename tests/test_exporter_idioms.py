"""Models as exporters write them (tests/exporter_models.py): the constant resolver reads every
parameter a fold needs, with the values onnxruntime computes; and fold_onnx folds every BN.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from bnfold.onnx_pass import fold_onnx
from bnfold.onnx_pass.constants import ConstantResolver
from exporter_models import IDIOMS
from onnx_models import assert_equivalent, count_op, random_feeds, run_model

_MODELS = {}


def model(name: str) -> onnx.ModelProto:
    if name not in _MODELS:
        if name.startswith("torch"):
            pytest.importorskip("torch")
        _MODELS[name] = IDIOMS[name]()
    return _MODELS[name]


# Which inputs of each op a fold reads as constants.
_PARAMS = {"Conv": slice(1, 3), "ConvTranspose": slice(1, 3), "Gemm": slice(1, 3), "BatchNormalization": slice(1, 5)}
_ELEMENTWISE = {"Mul", "Add", "Sub", "Div"}

# Float16 compute under float32 outputs: onnxruntime's own rounding moves outputs by ~1e-3 of
# their scale (issue 17), so the float16 idiom is compared at float16's tolerance.
_TOL = {"float16-keep-io": 1e-2}


def parameters(m: onnx.ModelProto, res: ConstantResolver):
    """(name, must_be_constant) for every value a fold of this model reads as a constant."""
    out = []
    for node in m.graph.node:
        if node.op_type in _PARAMS:
            out += [(n, True) for n in node.input[_PARAMS[node.op_type]] if n]
        elif node.op_type in _ELEMENTWISE:
            out += [(n, False) for n in node.input if res.is_constant(n)]
    return out


@pytest.mark.parametrize("name", sorted(IDIOMS))
def test_resolver_reads_every_parameter_as_onnxruntime_computes_it(name):
    m = model(name)
    res = ConstantResolver(m.graph, ir_version=m.ir_version, opset=m.opset_import[0].version)
    params = parameters(m, res)
    values = {}
    for pname, required in params:
        if required:
            values[pname] = res.value(pname, "parameter")  # a Refusal here fails the test
        else:
            values[pname] = res.value(pname)
    computed = {n: v for n, v in values.items() if res.subgraph(n)}
    assert computed or name.endswith("optimized") or name.startswith(("float16", "paddle", "ppocr")), (
        "the idiom was expected to put a parameter behind a constant subgraph"
    )
    if not computed:
        return
    # onnxruntime evaluates the same names when they are made graph outputs.
    probe = onnx.ModelProto()
    probe.CopyFrom(m)
    for n, v in computed.items():
        probe.graph.output.append(helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), None))
    got = run_model(probe, random_feeds(m))
    for n, v in computed.items():
        assert got[n].dtype == v.dtype and got[n].shape == v.shape, n
        np.testing.assert_array_equal(got[n], v, err_msg=n)
    assert res.stats.subgraphs == len(computed)


@pytest.mark.parametrize("name", sorted(IDIOMS))
def test_fold_is_equivalent(name):
    m = model(name)
    folded, _ = fold_onnx(m)
    assert_equivalent(m, folded, tol=_TOL.get(name))


@pytest.mark.parametrize("name", sorted(IDIOMS))
def test_fold_folds_every_batchnorm(name):
    m = model(name)
    assert count_op(m, "BatchNormalization") > 0
    folded, report = fold_onnx(m)
    assert count_op(folded, "BatchNormalization") == 0, [s.detail for s in report.skipped]
    assert_equivalent(m, folded, tol=_TOL.get(name))


def test_paddle_swish_no_op_mul_is_removed():
    m = model("paddle-swish")
    folded, _ = fold_onnx(m)
    assert count_op(folded, "Mul") == count_op(m, "Mul") - 2
    assert_equivalent(m, folded)


def test_ppocr_gelu_half_is_folded_into_the_conv():
    m = model("ppocr-gelu-tail")
    folded, _ = fold_onnx(m)
    assert count_op(folded, "Mul") == count_op(m, "Mul") - 1
    assert_equivalent(m, folded)


def test_torch_export_writes_deduplicated_initializers_as_identity():
    m = model("torch-dedup-biases")  # the builder asserts the idiom; here: which parameters
    inits = {t.name for t in m.graph.initializer}
    dedup = {n.output[0] for n in m.graph.node if n.op_type == "Identity" and n.input[0] in inits}
    readers = {n.op_type for n in m.graph.node for i in n.input[1:] if i in dedup}
    assert {"Conv", "Gemm", "BatchNormalization"} <= readers


@pytest.mark.parametrize("name", sorted(IDIOMS))
def test_removable_drops_exactly_the_constant_subgraphs_nothing_reads(name):
    """Emulate the engine: every parameter a fold reads becomes a new initializer holding the
    resolved value; what ``removable`` then proposes is removed. The model must stay valid and
    compute the same, and no evaluated op may be left that nothing reads."""
    from collections import Counter

    m = onnx.ModelProto()
    m.CopyFrom(model(name))
    g = m.graph
    res = ConstantResolver(g, ir_version=m.ir_version, opset=m.opset_import[0].version)
    released = set()
    for node in g.node:
        if node.op_type not in _PARAMS:
            continue
        for i in range(len(node.input))[_PARAMS[node.op_type]]:
            old = node.input[i]
            if old and res.subgraph(old):
                new = f"{old}_resolved"
                if new not in {t.name for t in g.initializer}:
                    g.initializer.append(onnx.numpy_helper.from_array(np.array(res.value(old)), new))
                    if m.ir_version < 4:
                        g.input.append(helper.make_tensor_value_info(new, g.initializer[-1].data_type, list(res.value(old).shape)))
                node.input[i] = new
                released.add(old)
    reads = Counter(i for n in g.node for i in set(n.input))
    gone = res.removable(released, lambda v: reads[v])
    drop = {id(n) for n in gone.nodes}
    kept = [n for n in g.node if id(n) not in drop]
    del g.node[:]
    g.node.extend(kept)
    inits = [t for t in g.initializer if t.name not in gone.initializers]
    del g.initializer[:]
    g.initializer.extend(inits)
    inputs = [i for i in g.input if i.name not in gone.initializers]
    del g.input[:]
    g.input.extend(inputs)
    onnx.checker.check_model(m, full_check=True)
    assert_equivalent(model(name), m, tol=_TOL.get(name))
    after = Counter(i for n in g.node for i in n.input) + Counter(o.name for o in g.output)
    for n in g.node:  # no evaluated op survives unread
        evaluated = bool(n.output) and res.is_constant(n.output[0]) and n.op_type != "Constant"
        assert not evaluated or any(after[o] for o in n.output), n.name
    if released:
        assert gone.nodes
