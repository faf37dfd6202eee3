"""What one execution of an HLO module does, counted from its text: FLOPs, HBM bytes and collectives.

XLA's `cost_analysis()` counts a while loop's body once, but a step runs its layer scan L times per pass and its
accumulation loop once per micro-batch: here every computation counts as often as it runs, a while body by the
trip count its condition compares the counter with (compiled TPU HLO carries no known_trip_count).
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "bf16": 2,
    "f16": 2,
    "s16": 2,
    "u16": 2,
    "f32": 4,
    "s32": 4,
    "u32": 4,
    "f64": 8,
    "s64": 8,
    "u64": 8,
}
# Ops that move no data of their own (bookkeeping, or loops and calls whose bodies are counted themselves).
_NO_TRAFFIC = {
    "parameter",
    "constant",
    "get-tuple-element",
    "tuple",
    "bitcast",
    "while",
    "call",
    "conditional",
    "after-all",
    "opt-barrier",
    "partition-id",
    "replica-id",
    "copy-done",
    "all-reduce-done",
    "all-gather-done",
    "collective-permute-done",
    "slice-done",
    "async-done",
    "async-update",
}
_SLICES = {"dynamic-slice", "slice", "gather"}
# XLA:TPU custom calls that move no data: a buffer's allocation, a view of adjacent slices as one array, an
# annotation of gather indices.
_NO_TRAFFIC_CALLS = {"AllocateBuffer", "ConcatBitcast", "AssumeGatherIndicesInBound"}
_LINE = re.compile(r"^\s*(ROOT )?%?([\w.\-]+) = (.*?) ([a-z][\w\-]*)\((.*)$")


@dataclasses.dataclass
class Op:
    name: str
    type: str
    kind: str
    args: str  # the text between the op's parentheses: operand names, or a constant's or parameter's value
    operands: list[str]
    attrs: str
    root: bool


@dataclasses.dataclass
class Counts:
    """Per execution of the module: FLOPs of its dots, bytes its ops read and write; `flops_once`: the dots' FLOPs
    with every computation counted once, as XLA's cost analysis counts them."""

    flops: float
    bytes_accessed: float
    flops_once: float


def count(hlo: str) -> Counts:
    comps = _parse(hlo)
    types = {op.name: op.type for ops in comps.values() for op in ops}
    fusions = {
        callee
        for ops in comps.values()
        for op in ops
        if op.kind == "fusion"
        for callee in re.findall(r"calls=%?([\w.\-]+)", op.attrs)
    }
    flops = traffic = once = 0.0
    for name, (times, _) in _executions(comps).items():
        for op in comps[name]:
            if op.kind == "dot":
                flops += times * _dot_flops(op, types)
                once += _dot_flops(op, types)
            if name not in fusions and op.kind not in _NO_TRAFFIC:  # a fusion's traffic is the fusion op's
                traffic += times * _traffic(op, types, comps)
    return Counts(flops, traffic, once)


def _parse(hlo: str) -> dict[str, list[Op]]:
    comps: dict[str, list[Op]] = {}
    current = None
    for line in hlo.splitlines():
        if line[:1] not in ("", " ", "}") and line.rstrip().endswith("{"):
            current = "ENTRY" if line.startswith("ENTRY") else line.split()[0].lstrip("%")
            comps[current] = []
        elif current is not None and (m := _LINE.match(line)):
            inner, attrs = _split_args(re.sub(r"/\*.*?\*/", "", m.group(5)))  # drop /*index=5*/ comments
            comps[current].append(
                Op(
                    m.group(2),
                    m.group(3),
                    m.group(4),
                    inner,
                    re.findall(r"%?([A-Za-z_][\w.\-]*)", inner),
                    attrs,
                    bool(m.group(1)),
                )
            )
    return comps


def _split_args(text: str) -> tuple[str, str]:
    """'a, b), attrs' -> ('a, b', 'attrs'): the operand list up to its matching parenthesis."""
    depth = 1
    for i, c in enumerate(text):
        depth += {"(": 1, ")": -1}.get(c, 0)
        if depth == 0:
            return text[:i], text[i + 1 :]
    return text, ""


def _executions(comps: dict[str, list[Op]]) -> dict[str, tuple[int, bool]]:
    """How often each computation reachable from ENTRY runs per execution (fusions included, reducers not), and
    whether it runs inside a while loop's body."""
    runs: dict[str, tuple[int, bool]] = {}

    def walk(name: str, times: int, in_loop: bool) -> None:
        if name not in comps:
            return
        before, looped = runs.get(name, (0, False))
        runs[name] = (before + times, looped or in_loop)
        for op in comps[name]:
            if loop := re.search(r"condition=%?([\w.\-]+), body=%?([\w.\-]+)", op.attrs):
                trips = _trip_count(comps.get(loop.group(1), []))
                walk(loop.group(1), times * (trips + 1), True)
                walk(loop.group(2), times * trips, True)
            callees = re.findall(r"(?:calls|branch_computations)=\{?%?([\w.\-]+)", op.attrs)
            if op.kind == "call":  # a reducer's to_apply is no computation of its own
                callees += re.findall(r"to_apply=%?([\w.\-]+)", op.attrs)
            for callee in callees:
                walk(callee, times, in_loop)

    walk("ENTRY", 1, False)
    return runs


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective op of a compiled program: the bytes of the whole array it works on (its result; a
    reduce-scatter's operand, of which each device keeps a share), executions per step (while-loop trip counts
    multiplied), whether it sits in a while loop's body, and its device groups (indices into the compile's
    device assignment, i.e. the mesh's devices in order; () = all devices)."""

    kind: str
    nbytes: int
    times: int
    in_loop: bool
    groups: tuple[tuple[int, ...], ...]


def collective_ops(hlo: str) -> list[Collective]:
    """Every collective of one execution of an HLO module, with how often it runs (the layer scan, accumulation)."""
    comps = _parse(hlo)
    types = {op.name: op.type for ops in comps.values() for op in ops}
    found = []
    for name, (times, in_loop) in _executions(comps).items():
        for op in comps[name]:
            kind = op.kind.removesuffix("-start")
            if kind not in COLLECTIVES:
                continue
            nbytes = shape_bytes(op.type, largest=kind != op.kind)  # an async start's tuple holds its operands too
            if kind == "all-reduce" and name.startswith("all-reduce-scatter"):
                kind = "reduce-scatter"  # XLA:TPU's fused all-reduce + slice: one reduce-scatter of the array
            elif kind == "reduce-scatter":
                nbytes = max(nbytes, sum(shape_bytes(types.get(operand, "")) for operand in op.operands))
            found.append(Collective(kind, nbytes, times, in_loop, _replica_groups(op.attrs)))
    return found


def collectives(hlo: str) -> dict[str, tuple[int, int]]:
    """(count, bytes) per collective kind in one execution of an HLO module."""
    totals: dict[str, list[int]] = {}
    for op in collective_ops(hlo):
        entry = totals.setdefault(op.kind, [0, 0])
        entry[0] += op.times
        entry[1] += op.times * op.nbytes
    return {k: (c, b) for k, (c, b) in totals.items()}


def _iota(dims: str, perm: str | None) -> np.ndarray:
    """An HLO iota device list: arange over `dims`, transposed by `perm`."""
    shape = [int(d) for d in dims.split(",")]
    ids = np.arange(math.prod(shape)).reshape(shape)
    return ids.transpose([int(p) for p in perm.split(",")]) if perm else ids


def _replica_groups(attrs: str) -> tuple[tuple[int, ...], ...]:
    """The device groups of a collective in any of XLA's three spellings: explicit lists ({{0,1},{2,3}}), an
    iota ([2,4]<=[4,2]T(1,0)), or mesh axes (mesh['a'=2,'b'=4], device_ids=([8]) {'b'})."""
    if m := re.search(r"replica_groups=\{((?:\{[\d,]*\},?)*)\}", attrs):
        return tuple(tuple(int(i) for i in g.split(",") if i) for g in re.findall(r"\{([\d,]*)\}", m.group(1)))
    if m := re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", attrs):
        return tuple(map(tuple, _iota(m.group(3), m.group(4)).reshape(int(m.group(1)), int(m.group(2))).tolist()))
    if m := re.search(
        r"replica_groups=mesh\[([^\]]*)\], device_ids=\(\[([\d,]+)\](?:T\(([\d,]+)\))?\) "
        r"\{([^}]*)\}",
        attrs,
    ):
        axes = re.findall(r"'(\w+)'=(\d+)", m.group(1))
        grouped = re.findall(r"'(\w+)'", m.group(4))
        ids = _iota(m.group(2), m.group(3)).reshape([int(n) for _, n in axes])
        order = [i for i, (a, _) in enumerate(axes) if a not in grouped] + [
            i for i, (a, _) in enumerate(axes) if a in grouped
        ]
        size = math.prod(int(n) for a, n in axes if a in grouped)
        return tuple(map(tuple, ids.transpose(order).reshape(-1, size).tolist()))
    return ()


def _trip_count(condition: list[Op]) -> int:
    """The scalar int constant a loop condition compares its counter with (scans count from 0 to it)."""
    bounds = [
        int(op.args) for op in condition if op.kind == "constant" and op.type.startswith("s32[]") and op.args.isdigit()
    ]
    return bounds[0] if bounds else 1


def _dot_flops(op: Op, types: dict[str, str]) -> float:
    """2 x output elements x contracted elements (a multiply and an add each)."""
    lhs = _dims(types.get(op.operands[0], "")) if op.operands else []
    contracted = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", op.attrs)
    k = math.prod(lhs[int(d)] for d in contracted.group(1).split(",") if d) if contracted and lhs else 1
    return 2.0 * math.prod(_dims(op.type)) * k


def _traffic(op: Op, types: dict[str, str], comps: dict[str, list[Op]]) -> int:
    """HBM bytes an op reads and writes. A fusion reading only a slice of an operand (a layer's weights out of
    the stacked [layers, ...] array in the layer scan) counts that slice; a dynamic-update-slice works in place:
    it reads nothing of its buffer and writes (and counts) its update only. Arrays the compiler placed in another
    memory space (an `S(n)` layout, n >= 1: XLA:TPU's memory-space assignment keeps them in on-chip memory) are
    not HBM traffic; the copies that prefetch or evict them are. An async start's result tuple holds its operands
    (a copy-start's: destination, source, context; not an all-reduce-start's): only the rest is written."""
    if op.kind == "custom-call" and (target := re.search(r'custom_call_target="([^"]+)"', op.attrs)):
        if target.group(1) in _NO_TRAFFIC_CALLS:
            return 0
    operands = [_hbm_bytes(types.get(name, "")) for name in op.operands]
    written = _hbm_bytes(op.type)
    if op.kind in _SLICES:  # reads the slice (where its operand is in HBM) and writes it
        return (shape_bytes(op.type) if operands and operands[0] else 0) + written
    if op.kind == "slice-start":  # ((operand), slice, context): reads and writes the slice
        return (_sizes(op.type)[1] if operands and operands[0] else 0) + _sizes(op.type, hbm_only=True)[1]
    if op.kind.endswith("-start") and op.kind != "all-reduce-start":  # an all-reduce-start's type: its results
        return sum(operands) + max(written - sum(operands), 0)
    if op.kind == "dynamic-update-slice":
        return 2 * (operands[1] if len(operands) > 1 else written)
    fused = re.search(r"calls=%?([\w.\-]+)", op.attrs) if op.kind == "fusion" else None
    if not (fused and comps.get(fused.group(1))):
        return sum(operands) + written
    body = comps[fused.group(1)]
    by_name = {u.name: u for u in body}
    for p in (p for p in body if p.kind == "parameter" and int(p.args) < len(operands)):
        operands[int(p.args)] = int(min(operands[int(p.args)], _read(body, p.name, comps)))
    root = next(u for u in body if u.root)
    outputs = [by_name.get(name) for name in root.operands] if root.kind == "tuple" else [root]
    outputs = [by_name.get(o.operands[0], o) if o is not None and o.kind == "bitcast" else o for o in outputs]
    written = sum(
        _hbm_bytes(types.get(o.operands[1], "")) if o.kind == "dynamic-update-slice" else _hbm_bytes(o.type)
        for o in outputs
        if o is not None
    )
    return sum(operands) + written


def _read(body: list[Op], param: str, comps: dict[str, list[Op]]) -> float:
    """Bytes a fused computation reads of its parameter `param`: the slices taken of it, nothing where it is
    only the buffer a dynamic-update-slice writes into, and through nested fusions and same-shape views (a
    layout change, a bitcast) of it; else all of it (inf)."""
    total = 0.0
    shape = _dims(next((u.type for u in body if u.name == param), ""))
    for user in (u for u in body if param in u.operands):
        nested = re.search(r"calls=%?([\w.\-]+)", user.attrs) if user.kind == "fusion" else None
        if user.kind in _SLICES and user.operands[0] == param:
            total += shape_bytes(user.type)
        elif user.kind == "dynamic-update-slice" and user.operands[0] == param:
            continue
        elif user.kind in ("fusion", "bitcast", "copy") and len(user.operands) == 1 and _dims(user.type) == shape:
            total += _read(body, user.name, comps)
        elif nested and comps.get(nested.group(1)):
            index = user.operands.index(param)
            inner = next(
                (p.name for p in comps[nested.group(1)] if p.kind == "parameter" and int(p.args) == index), None
            )
            total += _read(comps[nested.group(1)], inner, comps) if inner else math.inf
        else:
            return math.inf
    return total


def _dims(types: str) -> list[int]:
    match = re.search(r"\b[a-z]+\d*\[([\d,]*)\]", types)
    return [int(d) for d in match.group(1).split(",") if d] if match else []


def shape_bytes(types: str, largest: bool = False) -> int:
    """Bytes of an HLO result type; an async start's tuple also holds its operands, so take its largest array."""
    sizes = _sizes(types)
    return max(sizes, default=0) if largest else sum(sizes)


def _hbm_bytes(types: str) -> int:
    """Bytes of an HLO type's arrays that live in HBM (the default memory space)."""
    return sum(_sizes(types, hbm_only=True))


def _sizes(types: str, hbm_only: bool = False) -> list[int]:
    """Bytes of each array in an HLO type, in order; with `hbm_only`, 0 for one in another memory space (its
    layout says S(n), n >= 1)."""
    return [
        0
        if hbm_only and re.search(r"S\([1-9]\d*\)", layout)
        else _BYTES.get(t, 4) * math.prod(int(d) for d in dims.split(",") if d)
        for t, dims, layout in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\](\{[^}]*\})?", types)
    ]
