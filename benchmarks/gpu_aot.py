"""Compile the GPU check's training steps for an H100 on a machine with no GPU (XLA deviceless AOT).

    make gpu-aot                      # builds .venv-aot (the lent device's jax 0.11.2 + CUDA 13), runs this
    .venv-aot/bin/python benchmarks/gpu_aot.py --out OUTDIR
    .venv-aot/bin/python benchmarks/gpu_aot.py --cell mixed_bfloat16,128,fused \\
        --fused-blocks "" "vocab=256" "rows=128 stages=3"

An H100 is lent to this project rarely and for minutes (issue 12), so whatever can fail before
the first timed step should fail here instead. JAX's CUDA plugin can describe a GPU it does not
have (a PJRT topology built from XLA's target config, ``benchmarks/gpu_targets/h100_sxm.txtpb``)
and XLA's GPU compiler then compiles for it: the whole pipeline, Triton kernels and the PTX's
compilation to machine code included, up to the executable (serialized, it holds ELF objects and
no PTX). Each cell builds the real pretraining model exactly as
``synthetic.py`` does and compiles ``synthetic.bare_step`` (loss, gradients, optimizer update;
what the table's "bare ms/step" times) for the target, as the lent device would compile it.

Per cell, the table gives what the compiler knows without running anything:

- whether it compiles (else the compiler's first error line: e.g. a Triton block configuration
  over the 227 KB of shared memory a block may have fails here exactly as on the card);
- the executable's argument and temporary memory, whose sum is its device-memory need (within 3%
  of the 11-28 H100 run's measured ``peak_bytes_in_use`` in three of its four cells; that peak
  also covers ``fit``'s own step, which is not compiled here);
- kernels per step (fusions, library calls, Triton calls, copies: what is launched);
- bytes through the kernels' inputs and outputs (each operand counted whole, once per launch;
  a kernel's re-reads from L2, e.g. the fused loss's embedding blocks, are not counted) and the
  time those bytes take at the target's memory bandwidth: a floor, not a forecast.

Nothing here is a timing. ``--top N`` lists a cell's N kernels that move the most bytes.

Needs jax with its CUDA plugin (``jax[cuda13]`` or ``jax[cuda12]``); no GPU, driver or
TensorFlow. The plugin's version check needs the driver, so it is skipped here
(``JAX_SKIP_CUDA_CONSTRAINTS_CHECK``), and JAX's persistent cache is off (an executable compiled
for no local device cannot be read back).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import synthetic  # imports no ML library until a cell is built

from encoderflow import runtime
from encoderflow.config import PRESETS  # plain dataclasses: imports no ML library

HERE = Path(__file__).resolve().parent
TARGET = HERE / "gpu_targets" / "h100_sxm.txtpb"
# The cells of benchmarks/gpu.sh: its table, then its levers beside bfloat16 batch 128.
DEFAULT_CELLS = (
    "float32,128",
    "float32,1024",
    "mixed_bfloat16,128",
    "mixed_bfloat16,1024",
    "mixed_bfloat16,128,fused",
    "mixed_bfloat16,128,chunked",
    "mixed_bfloat16,128,logsumexp",
    "mixed_bfloat16,128,keras,30592",
)
# HLO instructions that launch nothing: bookkeeping, views and control flow (whose bodies count).
NOT_KERNELS = {
    "parameter",
    "constant",
    "get-tuple-element",
    "tuple",
    "bitcast",
    "while",
    "call",
    "conditional",
    "after-all",
    "partition-id",
    "replica-id",
    "opt-barrier",
    "add-dependency",
}
BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2}
BYTES.update({"f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16})
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16|c64|c128|f8\w*)\[([\d,]*)\]")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")


def setup_environment() -> None:
    """Before jax is imported: no driver check, no persistent cache; then, as synthetic.py does,
    no TensorFlow and Keras on JAX."""
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    os.environ["JAX_ENABLE_COMPILATION_CACHE"] = "false"
    synthetic.block_tensorflow()
    runtime.use_jax()


def type_bytes(text: str) -> float:
    """Bytes of an HLO type: an array (``bf16[4096,256]{1,0}``) or a tuple of them."""
    total = 0.0
    for dtype, dims in _ARRAY.findall(text):
        size = BYTES.get(dtype, 1 if dtype.startswith("f8") else 4)
        for d in filter(None, dims.split(",")):
            size *= int(d)
        total += size
    return total


def _split_type(rest: str) -> tuple[str, str]:
    """``TYPE opcode(...)`` -> (TYPE, ``opcode(...)``); a tuple type is parenthesised."""
    if rest.startswith("("):
        depth = 0
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                return rest[: i + 1], rest[i + 1 :].lstrip()
    head, _, tail = rest.partition(" ")
    return head, tail


def _operands(call: str) -> list[str]:
    """Names inside the opcode's parentheses (``%a, /*index=5*/%b`` or ``f32[2]{0} %a``)."""
    depth, end = 0, len(call)
    for i, ch in enumerate(call):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0 and ch == ")":
            end = i
            break
    return re.findall(r"%([\w.\-]+)", call[call.find("(") + 1 : end])


def parse_hlo(text: str) -> tuple[str, dict[str, list[dict]]]:
    """An HLO module's text: the entry computation's name, and every computation's instructions
    (name, opcode, bytes, operands, attributes) by name."""
    computations: dict[str, list[dict]] = {}
    entry = current = None
    for line in text.splitlines():
        if current is None:
            m = _COMPUTATION.match(line)
            if m:
                current = m.group(1)
                computations[current] = []
                if line.startswith("ENTRY"):
                    entry = current
            continue
        if line.startswith("}"):
            current = None
            continue
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        name, rest = m.groups()
        typ, call = _split_type(rest)
        computations[current].append(
            {
                "name": name,
                "opcode": call.split("(", 1)[0].strip(),
                "bytes": type_bytes(typ),
                "operands": _operands(call),
                "attrs": call,
            }
        )
    if entry is None:
        raise ValueError("no ENTRY computation in this HLO text")
    return entry, computations


def kernels(text: str) -> list[dict]:
    """What one execution of the module launches, each with the bytes through its inputs and
    output. A while body counts once per known trip (XLA's ``known_trip_count``, else once), its
    condition once more."""
    entry, comps = parse_hlo(text)
    sizes = {i["name"]: i["bytes"] for body in comps.values() for i in body}
    out: list[dict] = []

    def walk(name: str, times: int) -> None:
        for ins in comps.get(name, []):
            op = ins["opcode"]
            if op == "while":
                trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', ins["attrs"])
                n = int(trips.group(1)) if trips else 1
                for key, runs in (("body", n), ("condition", n + 1)):
                    callee = re.search(rf"\b{key}=%?([\w.\-]+)", ins["attrs"])
                    if callee:
                        walk(callee.group(1), times * runs)
            elif op in ("call", "conditional"):
                for callee in re.findall(r"(?:to_apply|branch_computations=\{|, )%([\w.\-]+)", ins["attrs"]):
                    walk(callee, times)
            elif op not in NOT_KERNELS:
                moved = ins["bytes"] + sum(sizes.get(o, 0) for o in ins["operands"])
                meta = re.search(r'op_name="([^"]+)"', ins["attrs"])
                out.append(
                    {
                        "name": ins["name"],
                        "opcode": op,
                        "times": times,
                        "bytes": moved * times,
                        "triton": "xla.gpu.triton" in ins["attrs"],
                        "op_name": meta.group(1) if meta else "",
                    }
                )

    walk(entry, 1)
    return out


def part_of(op_name: str) -> str:
    """Which part of the step a kernel belongs to, from the JAX op name XLA keeps in its metadata
    (``jit(step)/transpose(jvp(mlm_head))/...``): the MLM head and its loss, the encoder (embedding
    included), the optimizer, or other (e.g. XLA's own copies and pads, which carry no name)."""
    if "compile_loss" in op_name or "mlm_head" in op_name:
        return "head+loss"
    if "encoder" in op_name:
        return "encoder"
    if "adam" in op_name or "optimizer" in op_name:
        return "optimizer"
    return "other"


PARTS = ("head+loss", "encoder", "optimizer", "other")


def read_target(path: Path) -> tuple[str, dict]:
    """The target config's text and the facts the table quotes from it."""
    text = path.read_text()
    facts = {}
    for key in ("device_description_str", "memory_bandwidth", "core_count", "shared_memory_per_block_optin"):
        m = re.search(rf"\b{key}:\s*\"?([^\"\n]+)\"?", text)
        facts[key] = m.group(1).strip() if m else None
    return text, facts


def target_device(config_text: str, path: Path):
    """A compile-only CUDA device described by ``config_text`` (no GPU needed)."""
    import jax
    from jax.experimental import topologies

    try:
        topology = topologies.get_topology_desc(
            platform="cuda", topology_name="", topology="1x1x1", target_config=config_text
        )
    except (NotImplementedError, RuntimeError) as e:
        raise SystemExit(
            f"gpu_aot: jax {jax.__version__} here cannot compile for CUDA without a GPU ({e}). "
            "It needs JAX's CUDA plugin: `make gpu-aot` builds .venv-aot with the lent device's "
            f"versions (target config: {path})."
        ) from None
    return topology.devices[0]


def parse_cell(text: str) -> dict:
    """``precision,batch[,loss[,vocab]]``."""
    parts = [p.strip() for p in text.split(",")]
    if not 2 <= len(parts) <= 4:
        raise argparse.ArgumentTypeError(f"--cell {text!r}: expected precision,batch[,loss[,vocab]]")
    precision, batch, loss, vocab = parts + ["keras", "30522"][len(parts) - 2 :]
    return {"precision": precision, "batch_size": int(batch), "mlm_loss": loss, "vocab_size": int(vocab)}


def compile_cell(cfg, cell: dict, device, blocks: str | None = None, top: int = 0) -> dict:
    """Build the cell's model as ``synthetic.build`` does and compile its bare step for ``device``."""
    import jax

    result = {**cell, "blocks": blocks}
    if cell["mlm_loss"] == "fused":
        import head_loss

        head_loss.FORCE_TRITON = True
        head_loss.FUSED = head_loss.FusedBlocks.from_env(blocks)
        result["blocks"] = " ".join(f"{k}={v}" for k, v in vars(head_loss.FUSED).items())
    mlm, _ = synthetic.build(cfg, cell["vocab_size"], cell["precision"], total_steps=1000, loss=cell["mlm_loss"])
    (batch,) = synthetic.make_batches(cfg, cell["vocab_size"], cell["batch_size"], 1, seed=0)
    sharding = jax.sharding.SingleDeviceSharding(device)

    def spec(x):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    state, metrics = synthetic.step_state(mlm, spec)
    data = jax.tree.map(spec, batch)
    # Pallas asks the "current" GPU for its compute capability while lowering (jax >= 0.11).
    abstract = jax.sharding.AbstractDevice(device_kind=device.device_kind, num_cores=None, platform="cuda")
    t0 = time.perf_counter()
    try:
        with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=abstract)):
            lowered = synthetic.bare_step(mlm).lower(state, metrics, data)
        compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 - the compiler's refusal is this cell's result
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        return {**result, "error": f"{type(e).__name__}: {first}"[:300]}
    result["compile_s"] = time.perf_counter() - t0
    memory = compiled.memory_analysis()
    result["argument_bytes"] = memory.argument_size_in_bytes
    result["temp_bytes"] = memory.temp_size_in_bytes
    launched = kernels(compiled.as_text())
    result["kernels"] = sum(k["times"] for k in launched)
    result["triton_kernels"] = sum(k["times"] for k in launched if k["triton"])
    result["kernel_bytes"] = sum(k["bytes"] for k in launched)
    result["bytes_by_part"] = {part: 0.0 for part in PARTS}
    for k in launched:
        result["bytes_by_part"][part_of(k["op_name"])] += k["bytes"]
    if top:
        result["top"] = sorted(launched, key=lambda k: -k["bytes"])[:top]
    return result


def _mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f}"


def markdown(header: str, cells: list[dict], bandwidth: float | None) -> str:
    lines = [
        header,
        "",
        "| precision | batch | loss | vocab | fused blocks | compiles | compile s | args MiB | temp MiB "
        "| memory GiB | kernels/step | Triton | GB through kernels | of which head+loss / encoder / optimizer / other "
        "| floor ms at HBM bw |",
        "|---|---:|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for c in cells:
        blocks = c["blocks"] if c["mlm_loss"] == "fused" else "-"
        if "error" in c:
            lines.append(
                f"| {c['precision']} | {c['batch_size']} | {c['mlm_loss']} | {c['vocab_size']} | {blocks} "
                f"| NO: {c['error'].replace('|', '/')} | - | - | - | - | - | - | - | - | - |"
            )
            continue
        need = (c["argument_bytes"] + c["temp_bytes"]) / 2**30
        parts = " / ".join(f"{c['bytes_by_part'][p] / 1e9:.2f}" for p in PARTS)
        floor = "-" if not bandwidth else f"{c['kernel_bytes'] / bandwidth * 1e3:.2f}"
        lines.append(
            f"| {c['precision']} | {c['batch_size']} | {c['mlm_loss']} | {c['vocab_size']} | {blocks} | yes "
            f"| {c['compile_s']:.1f} | {_mib(c['argument_bytes'])} | {_mib(c['temp_bytes'])} | {need:.2f} "
            f"| {c['kernels']} | {c['triton_kernels']} | {c['kernel_bytes'] / 1e9:.2f} "
            f"| {parts} | {floor} |"
        )
    lines += [
        "",
        "compiles: XLA's GPU compiler for the target, Triton and machine code included, no GPU; memory: "
        "arguments + temporaries of the executable; kernels/step: launches of one bare step; GB "
        "through kernels: each launch's operands (whole) and output, split by the part of the step "
        "XLA's op names place them in (other: XLA's own pads and copies); floor: those bytes at the "
        "target's memory bandwidth, a lower bound for the step, not a forecast. No timing here.",
    ]
    for c in cells:
        for k in c.get("top", []):
            lines.append(
                f"- {c['precision']} b{c['batch_size']} {c['mlm_loss']}: {k['name']} ({k['opcode']}"
                f"{', Triton' if k['triton'] else ''}) {k['bytes'] / 1e6:,.0f} MB  {k['op_name']}"
            )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="gpu_aot.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--preset", default="guide", choices=sorted(PRESETS))
    ap.add_argument("--target", type=Path, default=TARGET, help="XLA GPU target config (text proto)")
    ap.add_argument(
        "--cell",
        action="append",
        type=parse_cell,
        default=[],
        help="precision,batch[,loss[,vocab]] (repeatable; default: benchmarks/gpu.sh's cells)",
    )
    ap.add_argument(
        "--fused-blocks",
        nargs="+",
        default=None,
        metavar="BLOCKS",
        help="fused cells: one compile per ENCODERFLOW_FUSED_BLOCKS text ('' = the defaults)",
    )
    ap.add_argument("--top", type=int, default=0, metavar="N", help="list each cell's N heaviest kernels")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", type=Path, help="write gpu_aot.md and gpu_aot.json into this folder")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    setup_environment()
    import jax

    config_text, facts = read_target(args.target)
    device = target_device(config_text, args.target)
    cfg = synthetic.config({"preset": args.preset, "set": args.set})
    cells = args.cell or [parse_cell(c) for c in DEFAULT_CELLS]
    results = []
    for cell in cells:
        for blocks in args.fused_blocks if cell["mlm_loss"] == "fused" and args.fused_blocks else [None]:
            print(f"gpu_aot: {cell} {blocks or ''}".rstrip(), flush=True)
            results.append(compile_cell(cfg, cell, device, blocks, args.top))
    import keras

    m, d = cfg.model, cfg.data
    header = (
        f"deviceless compile for {facts['device_description_str'] or device.device_kind} ({args.target.name}; "
        f"{facts['core_count']} SMs, {int(facts['memory_bandwidth'] or 0) / 1e12:.2f} TB/s, "
        f"{facts['shared_memory_per_block_optin']} B shared memory per block); preset {args.preset}"
        + (f" ({', '.join(args.set)})" if args.set else "")
        + f"; model {m.num_layers} layers, dim {m.model_dim}, {m.num_heads} heads; seq {d.seq_length}, "
        f"{d.predictions_per_seq} predictions/seq; the bare step; jax {jax.__version__}, keras {keras.__version__}"
    )
    bandwidth = float(facts["memory_bandwidth"]) if facts["memory_bandwidth"] else None
    text = markdown(header, results, bandwidth)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_aot.md").write_text(text)
        payload = {"header": header, "cells": results}
        (args.out / "gpu_aot.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print()
    print(text, end="")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
