"""FLOPs and HBM bytes of a compiled program, each loop body counted as often as it runs.

XLA's `compiled.cost_analysis()` counts a `while` body once, whatever its trip count: a train
step with 32 scanned layers and 8 microbatches is undercounted about 200x. This module reads the
compiled HLO text instead and weights every instruction by the product of the trip counts of
the loops around it:

- trip counts: a loop's condition compares its induction variable (a tuple element) with a
  constant, the element starts at a constant and the body adds a constant to it (the form
  `lax.scan` / `fori_loop` compile to); XLA's `known_trip_count`, when printed, is taken first.
  A loop of another form is counted once and listed in `unknown_loops`.
- FLOPs: 2 x M x N x K of every `dot` and `convolution` (XLA:TPU writes dots as convolutions,
  batched ones with an lhs-dilated window whose holes are not counted), inside fusions too;
  elementwise work is not counted. A Pallas kernel is opaque to XLA, so
  splash attention's kernels are counted from their operand shapes: forward 2 products,
  dq 3, dkv 4, each 2 x heads x Tq x Tk x Dh, times the fraction of key blocks a causal mask
  lets them visit (the kernel's `causal` scope, `models/attention.py`).
- bytes: every top-level instruction (a fusion is one) reads its operands and writes its
  result, as XLA's own estimate does; tuples, parameters, bitcasts and loop plumbing move no
  data.

`loop_bodies_once=True` gives the uncorrected figures, which should be close to XLA's own
(`check` in tests).
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

from safevlm_jax.models import attention

_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%(\S+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%(\S+)\s*=\s*")
_ARRAY = re.compile(r"([a-z]+[0-9]*)\[([0-9,]*)\](\{[^}]*\})?")
_MEMORY_SPACE = re.compile(r"S\((\d+)\)")  # in a TPU layout: 0 (absent) HBM, 1 VMEM, 5 host, ...
_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
             "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "s4": 1, "u4": 1,
             "f8e4m3fn": 1, "f8e5m2": 1, "token": 0}
_NO_TRAFFIC = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "call",
               "conditional", "after-all", "partition-id", "replica-id", "opt-barrier", "copy-done",
               "all-gather-done", "all-reduce-done", "collective-permute-done", "async-done",
               "send-done", "recv-done"}
# TPU custom calls that allocate, alias or annotate a buffer without reading or writing it
_NO_TRAFFIC_TARGETS = {"AllocateBuffer", "ConcatBitcast", "AssumeGatherIndicesInBound"}
_SPLASH_PRODUCTS = {"fwd": 2, "dq": 3, "dkv": 4}


@dataclasses.dataclass
class Instruction:
    name: str
    shapes: list[tuple[str, tuple[int, ...]]]  # (dtype, dims) of each array of the result
    opcode: str
    operands: list[str]
    attrs: str
    spaces: tuple[int, ...] = ()  # memory space of each array of the result (layout's S(n))

    def array_bytes(self, i: int) -> int:
        """Bytes array `i` of the result occupies in HBM (0 when it lives elsewhere)."""
        dt, dims = self.shapes[i]
        in_hbm = i >= len(self.spaces) or self.spaces[i] == 0
        return _ITEMSIZE.get(dt, 4) * math.prod(dims) if in_hbm else 0

    @property
    def bytes(self) -> int:
        """HBM bytes of the result: arrays in another memory space (VMEM, host) move no HBM data."""
        return sum(self.array_bytes(i) for i in range(len(self.shapes)))


@dataclasses.dataclass
class Cost:
    flops: float = 0.0
    bytes: float = 0.0
    unknown_loops: list[str] = dataclasses.field(default_factory=list)
    trip_counts: dict[str, int] = dataclasses.field(default_factory=dict)  # while name -> trips


def _matching(text: str, start: int) -> int:
    """Index just past the bracket that closes text[start]."""
    pairs = {"(": ")", "{": "}", "[": "]"}
    stack = []
    for i in range(start, len(text)):
        c = text[i]
        if c in pairs:
            stack.append(pairs[c])
        elif stack and c == stack[-1]:
            stack.pop()
            if not stack:
                return i + 1
    return len(text)


def _split_top(text: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for c in text:
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        if c == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
    if cur:
        parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def _parse_instruction(line: str) -> Instruction | None:
    m = _INSTRUCTION.match(line)
    if not m:
        return None
    rest = line[m.end():]
    end = _matching(rest, 0) if rest.startswith("(") else rest.index(" ")
    shape_text, rest = rest[:end], rest[end:].lstrip()
    arrays = _ARRAY.findall(shape_text)
    shapes = [(dt, tuple(int(d) for d in dims.split(",") if d)) for dt, dims, _ in arrays]
    spaces = tuple(int(s.group(1)) if (s := _MEMORY_SPACE.search(layout)) else 0 for _, _, layout in arrays)
    paren = rest.index("(")
    close = _matching(rest, paren)
    operands = [p.split()[-1].lstrip("%") for p in _split_top(rest[paren + 1:close - 1])]
    return Instruction(m.group(1), shapes, rest[:paren].strip(), operands, rest[close:], spaces)


def parse(hlo_text: str) -> tuple[dict[str, list[Instruction]], str]:
    """Computations of an HLO module's text -> ({name: instructions, the root last}, entry name)."""
    computations, entry, current, root, last = {}, None, None, None, None
    for line in hlo_text.splitlines():
        if current is None:
            m = _COMPUTATION.match(line)
            if m:
                current = computations.setdefault(m.group(1), [])
                if line.startswith("ENTRY"):
                    entry = m.group(1)
            continue
        if line.rstrip() == "}":
            if root is not None:  # the root last: it is what a computation returns
                current.append(root)
            current, root, last = None, None, None
            continue
        ins = _parse_instruction(line)
        if ins is None:  # a long attribute (a kernel's config) continues on this line
            if last is not None:
                last.attrs += line
            continue
        last = ins
        if line.lstrip().startswith("ROOT"):
            root = ins
        else:
            current.append(ins)
    if entry is None:
        raise ValueError("HLO text has no ENTRY computation")
    return computations, entry


def _attr(ins: Instruction, key: str) -> str | None:
    m = re.search(key + r"=%?([\w.\-]+)", ins.attrs)
    return m.group(1) if m else None


def _constant(by_name: dict[str, Instruction], name: str) -> int | None:
    """The integer a scalar value holds, when it is a constant (through copies)."""
    ins = by_name.get(name)
    while ins is not None and ins.opcode in ("copy", "convert", "bitcast") and ins.operands:
        ins = by_name.get(ins.operands[0])
    if ins is None or ins.opcode != "constant" or len(ins.operands) != 1:
        return None
    try:
        return int(ins.operands[0])
    except ValueError:
        return None


def _trip_count(comps, caller: dict[str, Instruction], loop: Instruction) -> int | None:
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"', loop.attrs)
    if known:
        return int(known.group(1))
    cond = {i.name: i for i in comps[_attr(loop, "condition")]}
    body = {i.name: i for i in comps[_attr(loop, "body")]}
    root = comps[_attr(loop, "condition")][-1]
    direction = re.search(r"direction=(\w+)", root.attrs)
    if root.opcode != "compare" or not direction:
        return None

    def element(by_name, name):  # the tuple index a value reads, through copies
        ins = by_name.get(name)
        while ins is not None and ins.opcode in ("copy", "convert") and ins.operands:
            ins = by_name.get(ins.operands[0])
        if ins is not None and ins.opcode == "get-tuple-element":
            return int(re.search(r"index=(\d+)", ins.attrs).group(1))
        return None

    a, b = root.operands
    op = direction.group(1)
    if element(cond, a) is None:  # constant on the left: mirror the comparison
        a, b = b, a
        op = {"LT": "GT", "GT": "LT", "LE": "GE", "GE": "LE"}.get(op, op)
    index, limit = element(cond, a), _constant(cond, b)
    init_tuple = caller.get(loop.operands[0])
    if index is None or limit is None or init_tuple is None or init_tuple.opcode != "tuple":
        return None
    start = _constant(caller, init_tuple.operands[index])
    update = body.get(comps[_attr(loop, "body")][-1].operands[index])
    if start is None or update is None or update.opcode not in ("add", "subtract"):
        return None
    step = next((_constant(body, o) for o in update.operands if _constant(body, o) is not None), None)
    if not step:
        return None
    step = step if update.opcode == "add" else -step
    span = {"LT": limit - start, "LE": limit - start + 1, "GT": start - limit, "GE": start - limit + 1,
            "NE": limit - start}.get(op)
    if span is None:
        return None
    return max(0, -(-span // abs(step)))


def _dot_flops(ins: Instruction, shapes: dict[str, Instruction]) -> float:
    out = math.prod(ins.shapes[0][1]) if ins.shapes else 0
    if ins.opcode == "dot":
        lhs = shapes.get(ins.operands[0])
        dims = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins.attrs)
        if lhs is None or not dims:
            return 0.0
        k = math.prod(lhs.shapes[0][1][int(d)] for d in dims.group(1).split(",") if d)
        return 2.0 * out * k
    # a convolution: each output element contracts the kernel's input features over the window
    # taps that land on input elements. XLA:TPU writes dots as convolutions whose windows run
    # mostly over padding (size 32, padded 31 on each side of one element: one tap per output)
    # or lhs dilation holes (size 64 over lhs_dilate 64: one tap), so only those taps count.
    lhs, kernel = shapes.get(ins.operands[0]), shapes.get(ins.operands[1])
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", ins.attrs)
    if lhs is None or kernel is None or not labels:
        return 0.0
    lhs_labels, kernel_labels, out_labels = labels.groups()
    features = kernel.shapes[0][1][kernel_labels.index("i")]
    window = _window(ins.attrs)
    taps = 1.0
    for d, (size, stride, (lo, _), dilate, rhs_dilate) in enumerate(window):
        n = lhs.shapes[0][1][lhs_labels.index(str(d))]
        outputs = ins.shapes[0][1][out_labels.index(str(d))]
        taps *= _valid_taps(n, outputs, size, stride, lo, dilate, rhs_dilate) / max(outputs, 1)
    return 2.0 * out * features * taps


def _window(attrs: str) -> list[tuple[int, int, tuple[int, int], int, int]]:
    """A convolution's window per spatial dimension: (size, stride, (pad low, high), lhs
    dilation, rhs dilation)."""
    text = re.search(r"window=\{([^}]*)\}", attrs)
    fields = dict(f.split("=") for f in text.group(1).split()) if text else {}
    sizes = [int(n) for n in fields.get("size", "").split("x") if n]

    def per_dim(key, default):
        return [int(n) for n in fields[key].split("x")] if key in fields else [default] * len(sizes)

    pads = [tuple(int(n) for n in p.split("_")) for p in fields["pad"].split("x")] if "pad" in fields else \
        [(0, 0)] * len(sizes)
    return list(zip(sizes, per_dim("stride", 1), pads, per_dim("lhs_dilate", 1), per_dim("rhs_dilate", 1)))


def _valid_taps(n: int, outputs: int, size: int, stride: int, pad_lo: int, dilate: int, rhs_dilate: int) -> int:
    """(output position, window tap) pairs of one spatial dimension that read an input element,
    not padding or a hole between dilated elements."""
    at = np.arange(outputs)[:, None] * stride + np.arange(size)[None, :] * rhs_dilate - pad_lo
    return int(np.count_nonzero((at >= 0) & (at <= (n - 1) * dilate) & (at % dilate == 0)))


def _splash_flops(ins: Instruction, shapes: dict[str, Instruction]) -> float:
    phase = re.match(r"splash_m[hq]a_(fwd|dq|dkv)", ins.name)
    arrays = [shapes[o].shapes[0] for o in ins.operands
              if o in shapes and shapes[o].shapes and shapes[o].shapes[0][0] in ("bf16", "f32", "f16")
              and len(shapes[o].shapes[0][1]) >= 2]
    if not phase or len(arrays) < 2:
        return 0.0
    q, k = arrays[0][1], arrays[1][1]
    rows, tk, dh = math.prod(q[:-1]), k[-2], q[-1]  # rows: heads x queries
    visited = 1.0
    if "/causal/" in ins.attrs:  # the kernel's scope (models/attention.py); blocks from its config
        block = re.search(r'block_kv\\?": (\d+)', ins.attrs)
        n = tk // (int(block.group(1)) if block else attention.splash_block(tk))
        visited = (n + 1) / (2 * n)
    return 2.0 * _SPLASH_PRODUCTS[phase.group(1)] * rows * tk * dh * visited


def _read(comps, computation: str, index: int, size: int) -> float:
    """Bytes a fused computation reads of its parameter `index` (of `size` bytes): only the
    slices when every use is a (dynamic-)slice, nothing when it is the buffer of an in-place
    dynamic-update-slice, looking through nested fusions."""
    body = comps[computation]
    name = next((i.name for i in body if i.opcode == "parameter" and i.operands == [str(index)]), None)
    total = 0.0
    for user in (u for u in body if name in u.operands):
        if user.opcode in ("dynamic-slice", "slice") and user.operands[0] == name:
            total += user.bytes
        elif user.opcode == "dynamic-update-slice" and user.operands[0] == name:
            continue
        elif user.opcode == "fusion":
            total += sum(_read(comps, _attr(user, "calls"), k, size)
                         for k, o in enumerate(user.operands) if o == name)
        else:
            return float(size)
    return min(total, float(size))


def _written(comps, ins: Instruction, by_name: dict[str, Instruction]) -> float:
    """Bytes an instruction writes: its result, but only the update of an in-place
    dynamic-update-slice (looking through fusions and tuples)."""
    if ins.opcode == "copy-start":  # (destination, source, context): a prefetch or an eviction
        return ins.array_bytes(0)
    if ins.opcode == "dynamic-update-slice":
        update = by_name.get(ins.operands[1])
        return update.bytes if update is not None else ins.bytes
    if ins.opcode == "fusion":
        inner = comps[_attr(ins, "calls")]
        return _written(comps, inner[-1], {i.name: i for i in inner})
    if ins.opcode == "tuple":
        return sum(_written(comps, by_name[o], by_name) if o in by_name else 0 for o in ins.operands)
    return ins.bytes


def _traffic(ins: Instruction, by_name: dict[str, Instruction], comps) -> float:
    """HBM bytes one top-level instruction moves: its operands read and its result written,
    except that a (dynamic-)slice reads only the slice and a dynamic-update-slice writes only
    the update into a buffer it neither reads nor copies (in place), also inside a fusion: a
    scanned layer reads its own slice of the stacked weights, not all of them."""
    read = 0.0
    for k, o in enumerate(ins.operands):
        size = by_name[o].bytes if o in by_name else 0
        if ins.opcode == "fusion":
            read += _read(comps, _attr(ins, "calls"), k, size)
        elif ins.opcode == "dynamic-slice" and k == 0:
            read += ins.bytes
        elif not (ins.opcode == "dynamic-update-slice" and k == 0):
            read += size
    return read + _written(comps, ins, by_name)


def _moves_data(ins: Instruction) -> bool:
    if ins.opcode == "custom-call":
        target = re.search(r'custom_call_target="([^"]*)"', ins.attrs)
        return not (target and target.group(1) in _NO_TRAFFIC_TARGETS)
    return ins.opcode not in _NO_TRAFFIC


def cost(hlo_text: str, loop_bodies_once: bool = False) -> Cost:
    """Loop-corrected FLOPs and bytes of one execution of a compiled module (see the module
    docstring); `loop_bodies_once`: every loop body counted once, as XLA's cost analysis does."""
    comps, entry = parse(hlo_text)
    result = Cost()

    def walk(name: str, times: float, fused: bool) -> None:
        instructions = comps[name]
        by_name = {i.name: i for i in instructions}
        for ins in instructions:
            if ins.opcode in ("dot", "convolution"):
                result.flops += times * _dot_flops(ins, by_name)
            elif ins.opcode == "custom-call" and ins.name.startswith("splash_"):
                result.flops += times * _splash_flops(ins, by_name)
            if not fused and _moves_data(ins):
                result.bytes += times * _traffic(ins, by_name, comps)
            if ins.opcode == "fusion":
                walk(_attr(ins, "calls"), times, True)
            elif ins.opcode == "while":
                trips = _trip_count(comps, by_name, ins)
                if trips is None:
                    result.unknown_loops.append(ins.name)
                    trips = 1
                result.trip_counts[ins.name] = trips
                walk(_attr(ins, "body"), times * (1 if loop_bodies_once else trips), False)
            elif ins.opcode == "call":
                walk(_attr(ins, "to_apply"), times, fused)
            elif ins.opcode == "conditional":
                branches = re.search(r"branch_computations=\{([^}]*)\}", ins.attrs)
                names = ([b.strip().lstrip("%") for b in branches.group(1).split(",")] if branches else
                         [_attr(ins, "true_computation"), _attr(ins, "false_computation")])
                for branch in filter(None, names):
                    walk(branch, times, fused)

    walk(entry, 1.0, False)
    return result
