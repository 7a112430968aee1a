"""Where a jitted step's device time goes: a `jax.profiler` trace joined with the compiled HLO.

A trace (`jax.profiler.trace(..., create_perfetto_trace=True)` writes it as
Chrome-trace JSON) has one event per executed HLO op (CPU: each thunk; GPU:
each kernel, on the device's "Stream" lines) with the op's name in
`args.hlo_op` and its module in `args.hlo_module`. The compiled module's text
(`jitted.lower(...).compile().as_text()`) says what each op is: the
instructions a fusion calls (a `dot` makes it a matmul), the `op_name` of each
(`transpose(jvp(...))` marks the backward pass, `jvp(...)` the forward one,
anything else the update), and the Python call stack that built it (the
`FileNames` / `FunctionNames` / `FileLocations` / `StackFrames` tables). So
each op's time is attributed to a kind, a pass and a line of model code.

Checked against real traces of this JAX (0.10) on the CPU; the GPU rules (the
"/device:" processes, their "Stream" threads, custom-call targets) follow the
trace and HLO formats JAX's profiler and XLA's GPU backend write, and
`tools/step_profile.py` prints the traced time next to the measured step time so a
misread GPU trace shows (more traced time than the step takes).
"""

from __future__ import annotations

import collections
import dataclasses
import gzip
import json
import pathlib
import re
from collections.abc import Iterable, Mapping

_INSTRUCTION = re.compile(r"^\s+(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_CALLED = re.compile(
    r"\b(?:calls|condition|body|to_apply|branch_computations|called_computations|"
    r"true_computation|false_computation)=(\{[^}]*\}|%?[\w.\-]+)"
)
_TARGET = re.compile(r'custom_call_target="([^"]*)"')
_OP_NAME = re.compile(r'op_name="((?:[^"\\]|\\.)*)"')
_FRAME = re.compile(r"\bstack_frame_id=(\d+)")
_SOURCE = re.compile(r'source_file="([^"]*)"\s+source_line=(\d+)')
_TABLES = ("FileNames", "FunctionNames", "FileLocations", "StackFrames")

# Opcodes whose own trace event spans the ops of the computations they run
# (those are traced one by one), so counting both would count twice.
CONTROL_FLOW = frozenset({"while", "conditional", "call"})
COLLECTIVES = frozenset(
    {
        "all-reduce",
        "all-gather",
        "reduce-scatter",
        "all-to-all",
        "collective-permute",
        "all-reduce-start",
        "all-reduce-done",
        "all-gather-start",
        "all-gather-done",
        "collective-permute-start",
        "collective-permute-done",
    }
)
# Instructions that carry no work of their own: left out when a fusion's
# members vote on its pass and its source line.
_BOOKKEEPING = frozenset(
    {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "broadcast", "reshape"}
)
KINDS = ("matmul", "fused kernel", "collective", "copy", "elementwise")
PHASES = ("forward", "backward", "update")


@dataclasses.dataclass(frozen=True)
class Instruction:
    """One HLO instruction, as much of it as the attribution needs."""

    name: str
    opcode: str
    called: tuple[str, ...]  # computations it runs (fusion body, loop body, reducer, ...)
    target: str  # custom-call target, "" for other opcodes
    op_name: str  # JAX's name stack of the primitive, "" without metadata
    frame: int  # stack frame id (1-based), 0 without one
    source: tuple[str, int] | None  # (file, line) of older HLO metadata without frames
    text: str = ""  # everything after "name = ": result type, opcode, operands, attributes


@dataclasses.dataclass(frozen=True)
class Frame:
    """One Python frame of the call stack that traced an instruction."""

    file: str
    function: str
    line: int

    def label(self) -> str:
        where = f"{pathlib.Path(self.file).name}:{self.line}"
        return f"{self.function} ({where})" if self.function else where


def _opcode(rest: str) -> str:
    """The opcode of an instruction's text after "name = ": the type comes first
    (a tuple type is parenthesised and may hold spaces), then `opcode(`."""
    if rest.startswith("("):
        depth = 0
        for i, char in enumerate(rest):
            depth += {"(": 1, ")": -1}.get(char, 0)
            if depth == 0:
                rest = rest[i + 1 :]
                break
    else:
        rest = rest.split(" ", 1)[1] if " " in rest else ""
    match = re.match(r"\s*([\w\-$]+)\(", rest)
    return match.group(1) if match else ""


def _called(rest: str) -> tuple[str, ...]:
    names = []
    for value in _CALLED.findall(rest):
        names += [name.strip().lstrip("%") for name in value.strip("{}").split(",") if name.strip()]
    return tuple(names)


def _parse_instruction(name: str, rest: str) -> Instruction:
    target = _TARGET.search(rest)
    op_name = _OP_NAME.search(rest)
    frame = _FRAME.search(rest)
    source = _SOURCE.search(rest)
    return Instruction(
        name=name,
        opcode=_opcode(rest),
        called=_called(rest),
        target=target.group(1) if target else "",
        op_name=op_name.group(1) if op_name else "",
        frame=int(frame.group(1)) if frame else 0,
        source=(source.group(1), int(source.group(2))) if source else None,
        text=rest,
    )


@dataclasses.dataclass
class HloModule:
    """The instructions of a compiled module and the call stacks that built them."""

    name: str
    instructions: dict[str, Instruction]
    computations: dict[str, list[str]]  # computation -> its instructions' names
    entry: str  # the ENTRY computation's name
    frames: dict[int, tuple[int, int]]  # frame id -> (location id, parent frame id, 0 = none)
    locations: dict[int, Frame]

    @classmethod
    def parse(cls, text: str) -> HloModule:
        """Reads `compiled.as_text()`."""
        lines = text.splitlines()
        header = re.match(r"HloModule\s+([\w.\-]+)", lines[0]) if lines else None
        if header is None:
            raise ValueError("not the text of an HLO module: it must start with 'HloModule NAME'")
        tables = _tables(lines)
        names = {key: tables.get(key, {}) for key in ("FileNames", "FunctionNames")}
        locations = {}
        for key, fields in tables.get("FileLocations", {}).items():
            values = dict(re.findall(r"(\w+)=(\d+)", fields))
            locations[key] = Frame(
                file=names["FileNames"].get(int(values.get("file_name_id", 0)), "").strip('"'),
                function=names["FunctionNames"]
                .get(int(values.get("function_name_id", 0)), "")
                .strip('"'),
                line=int(values.get("line", 0)),
            )
        frames = {}
        for key, fields in tables.get("StackFrames", {}).items():
            values = dict(re.findall(r"(\w+)=(\d+)", fields))
            # In the text a frame's parent_frame_id is its parent's printed id + 1
            # (1 or 0 at a root): p names frame p - 1. tests/test_hlo_trace.py
            # checks the chain against the Python stack that traced a function.
            parent = int(values.get("parent_frame_id", 0)) - 1
            frames[key] = (int(values.get("file_location_id", 0)), max(parent, 0))
        instructions: dict[str, Instruction] = {}
        computations: dict[str, list[str]] = {}
        current: list[str] | None = None
        entry = ""
        for line in lines:
            if current is None:
                match = _COMPUTATION.match(line)
                if match:
                    current = computations.setdefault(match.group(1), [])
                    entry = match.group(1) if line.startswith("ENTRY") else entry
                continue
            if line.startswith("}"):
                current = None
                continue
            match = _INSTRUCTION.match(line)
            if match:
                instruction = _parse_instruction(match.group(1), match.group(2))
                instructions[instruction.name] = instruction
                current.append(instruction.name)
        return cls(header.group(1), instructions, computations, entry, frames, locations)

    def members(self, name: str) -> list[Instruction]:
        """The instruction and every instruction of the computations it runs, recursively."""
        out, pending, seen = [], [name], set()
        while pending:
            instruction = self.instructions.get(pending.pop())
            if instruction is None or instruction.name in seen:
                continue
            seen.add(instruction.name)
            out.append(instruction)
            for computation in instruction.called:
                pending += self.computations.get(computation, [])
        return out

    def stack(self, instruction: Instruction) -> list[Frame]:
        """The Python frames that traced `instruction`, innermost first."""
        if instruction.source is not None:
            return [Frame(instruction.source[0], "", instruction.source[1])]
        out, frame, seen = [], instruction.frame, set()
        while frame and frame not in seen and frame in self.frames:
            seen.add(frame)
            location, frame = self.frames[frame]
            if location in self.locations:
                out.append(self.locations[location])
        return out


def _tables(lines: list[str]) -> dict[str, dict[int, str]]:
    """The numbered tables between the module header and its first computation."""
    tables: dict[str, dict[int, str]] = {}
    current = None
    for line in lines[1:]:
        if line in _TABLES:
            current = tables.setdefault(line, {})
        elif current is not None and re.match(r"^\d+ ", line):
            key, value = line.split(" ", 1)
            current[int(key)] = value
        elif line.strip() == "":
            current = None
        elif current is None:
            break
    return tables


def kind(members: Iterable[Instruction]) -> str:
    """What an op is: a "matmul" (it holds a dot or a GEMM library call), a "fused
    kernel" (a Triton or Mosaic custom call: the Pallas kernels), a "collective",
    a "copy" (a copy, transpose, or a fusion of nothing else: layout only), else
    "elementwise" (XLA's loop and reduction fusions)."""
    members = list(members)
    opcodes = {i.opcode for i in members}
    targets = " ".join(i.target.lower() for i in members)
    if opcodes & COLLECTIVES:
        return "collective"
    if opcodes & {"dot", "convolution"} or re.search(r"gemm|matmul|cublas", targets):
        return "matmul"
    if re.search(r"triton|mosaic|pallas", targets):
        return "fused kernel"
    if opcodes - {"fusion"} <= {"copy", "transpose", *_BOOKKEEPING}:
        return "copy"
    return "elementwise"


def phase(op_name: str) -> str:
    """The pass an op belongs to, from JAX's name stack: autodiff's transpose is
    the backward pass, its jvp the forward one, the rest (clipping, AdamW,
    metrics) the update."""
    if "transpose(" in op_name:
        return "backward"
    if "jvp(" in op_name:
        return "forward"
    return "update"


def _vote(values: Iterable[str], default: str) -> str:
    counts = collections.Counter(v for v in values if v)
    return counts.most_common(1)[0][0] if counts else default


def source(module: HloModule, members: list[Instruction], within: str = "") -> str:
    """The line of code most of an op's instructions were traced from, with its
    nearest caller in another file (which Dropout, which LayerNorm). Frames in
    files outside the folder `within` (the script that called the step) are
    skipped when the stack has others."""
    labels = []
    for instruction in members:
        if instruction.opcode in _BOOKKEEPING:
            continue
        stack = module.stack(instruction)
        stack = [f for f in stack if f.file.startswith(within)] or stack
        if not stack:
            continue
        caller = next((f for f in stack[1:] if f.file != stack[0].file), None)
        labels.append(stack[0].label() + (f" <- {caller.label()}" if caller else ""))
    if labels:
        return _vote(labels, "")
    first = members[0]
    return f"[{first.op_name.rsplit('/', 1)[-1] or first.opcode}]"


@dataclasses.dataclass(frozen=True)
class OpTime:
    """One HLO op's traced time and what it is."""

    name: str
    kind: str
    phase: str
    source: str
    microseconds: float


def load_trace(path: str | pathlib.Path) -> dict:
    """A Chrome-trace JSON file, gzipped or not."""
    path = pathlib.Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return json.load(f)


def find_trace(directory: str | pathlib.Path) -> pathlib.Path:
    """The perfetto trace `jax.profiler.trace(directory, create_perfetto_trace=True)` wrote."""
    found = sorted(pathlib.Path(directory).glob("**/perfetto_trace.json.gz"))
    if not found:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {directory}")
    return found[-1]


def _events_and_names(trace) -> tuple[list, dict, dict]:
    """A trace's events, its process names by pid and thread names by (pid, tid)."""
    events = trace["traceEvents"] if isinstance(trace, Mapping) else trace
    processes, threads = {}, {}
    for event in events:
        if event.get("ph") != "M":
            continue
        if event.get("name") == "process_name":
            processes[event.get("pid")] = event["args"]["name"]
        elif event.get("name") == "thread_name":
            threads[(event.get("pid"), event.get("tid"))] = event["args"]["name"]
    return events, processes, threads


def op_lines(trace: Mapping) -> dict[str, int]:
    """How many events name an HLO op on each "process / thread" line of `trace`:
    what to look at when `op_times` finds nothing or counts an op twice."""
    events, processes, threads = _events_and_names(trace)
    lines: dict[str, int] = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and "hlo_op" in e.get("args", {}):
            key = (e.get("pid"), e.get("tid"))
            lines[f"{processes.get(key[0], key[0])} / {threads.get(key, key[1])}"] += 1
    return dict(lines)


def op_times(trace: Mapping, module: str) -> dict[str, float]:
    """Total microseconds of each op of HLO module `module` in `trace`.

    On a device (processes named "/device:..."), only the kernel events of its
    "Stream" threads count when it has any (a trace may repeat the ops on
    derived lines such as "XLA Ops"); on a CPU, every event that names an op.
    """
    events, processes, threads = _events_and_names(trace)
    named = [
        e
        for e in events
        if e.get("ph") == "X"
        and "hlo_op" in e.get("args", {})
        and str(e["args"].get("hlo_module", "")).split("(")[0] == module
    ]
    on_device = [e for e in named if str(processes.get(e.get("pid"), "")).startswith("/device:")]
    if on_device:
        streams = [
            e
            for e in on_device
            if threads.get((e.get("pid"), e.get("tid")), "").startswith("Stream")
        ]
        named = streams or on_device
    times: dict[str, float] = collections.defaultdict(float)
    for event in named:
        times[event["args"]["hlo_op"]] += float(event.get("dur", 0.0))
    return dict(times)


def attribute(module: HloModule, times: Mapping[str, float], within: str = "") -> list[OpTime]:
    """Each traced op with its kind, pass and source (`source`'s `within`), largest
    first. Ops that only run other computations (loops, calls) are left out:
    their bodies' ops are traced on their own."""
    out = []
    for name, microseconds in times.items():
        instruction = module.instructions.get(name)
        if instruction is None:
            out.append(OpTime(name, "elementwise", "update", "[not in the HLO]", microseconds))
            continue
        if instruction.opcode in CONTROL_FLOW:
            continue
        members = module.members(name)
        work = [i for i in members if i.opcode not in _BOOKKEEPING] or members
        out.append(
            OpTime(
                name=name,
                kind=kind(members),
                phase=_vote((phase(i.op_name) for i in work if i.op_name), "update"),
                source=source(module, members, within),
                microseconds=microseconds,
            )
        )
    return sorted(out, key=lambda op: -op.microseconds)


def summarise(ops: list[OpTime], steps: int, top: int = 15) -> dict:
    """Milliseconds per step by kind and pass, by source line, and the largest ops."""
    per_step = 1e-3 / steps

    def total(selected) -> float:
        return sum(op.microseconds for op in selected) * per_step

    by_source: dict[str, list[OpTime]] = collections.defaultdict(list)
    for op in ops:
        by_source[op.source].append(op)
    sources = sorted(by_source.items(), key=lambda item: -total(item[1]))
    return {
        "traced_ms_per_step": total(ops),
        "by_kind": {
            k: {p: total(o for o in ops if o.kind == k and o.phase == p) for p in PHASES}
            for k in KINDS
        },
        "by_source": [
            {
                "source": name,
                "ms_per_step": total(group),
                "kinds": sorted({op.kind for op in group}),
                "ops": len(group),
            }
            for name, group in sources[:top]
        ],
        "top_ops": [
            {
                "op": op.name,
                "kind": op.kind,
                "phase": op.phase,
                "source": op.source,
                "ms_per_step": op.microseconds * per_step,
            }
            for op in ops[:top]
        ],
    }
