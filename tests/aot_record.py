"""Compile, for sm_90 (Hopper) and without a GPU, every Triton kernel launch that a script makes
under Triton's interpreter.

The interpreter runs kernels as Python, so it accepts code that Triton's compiler rejects (a name
bound under a constexpr branch and read under a runtime one compiled nowhere, and the interpreter
ran it). `record(script, argv)` runs `script` in a subprocess with TRITON_INTERPRET=1 and writes
down each distinct launch: the kernel's module and name, each argument's Triton type (a tensor's
element type as a pointer, an int as i32 / i64, a float as fp32) or, for constexpr parameters and
None, its value, and the launch options (num_warps, num_stages). `compile_all(records)` compiles
each with Triton's own compiler and the ptxas it ships, for GPUTarget("cuda", 90, 32), in this
process (where kernels are JIT functions), and returns the failures. The launches carry the CPU
tests' dtypes and constants (fp32 mostly), so this says whether the kernel code compiles, not that
every configuration a GPU run uses does (tests/engine/test_moe_kernels.py compiles the engine's TMA
configurations themselves).
"""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64", "int8": "i8",
           "int16": "i16", "int32": "i32", "int64": "i64", "uint8": "u8", "uint16": "u16", "uint32": "u32",
           "uint64": "u64", "bool": "i1"}
_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")

_RECORDER = r"""
import inspect, json, sys
import triton
from triton.runtime.interpreter import InterpretedFunction

_path, _seen, _run = sys.argv.pop(1), set(), InterpretedFunction.run
_DTYPES = __DTYPES__
_OPTIONS = __OPTIONS__


def _describe(fn, args, kwargs):
    params = list(inspect.signature(fn).parameters.values())
    given = dict(zip([p.name for p in params], args))
    given.update({k: v for k, v in kwargs.items() if k not in _OPTIONS})
    sig, consts = {}, {}
    for p in params:
        v = given.get(p.name, p.default)
        if v is inspect.Parameter.empty:
            return {"skip": f"{fn.__name__}: no value for {p.name}"}
        if "constexpr" in str(p.annotation) or v is None:
            if not isinstance(v, (bool, int, float, str, type(None))):
                return {"skip": f"{fn.__name__}: constexpr {p.name} = {v!r} is not plain data"}
            sig[p.name], consts[p.name] = "constexpr", v
        elif hasattr(v, "dtype") and hasattr(v, "data_ptr"):
            sig[p.name] = "*" + _DTYPES[str(v.dtype).replace("torch.", "")]
        elif isinstance(v, bool):
            sig[p.name] = "i1"
        elif isinstance(v, int):
            sig[p.name] = "i32" if -2**31 <= v < 2**31 else "i64"
        elif isinstance(v, float):
            sig[p.name] = "fp32"
        else:
            return {"skip": f"{fn.__name__}: argument {p.name} of type {type(v).__name__}"}
    options = {k: kwargs[k] for k in _OPTIONS if k in kwargs}
    return {"module": fn.__module__, "name": fn.__name__, "signature": sig, "constexprs": consts,
            "options": options}


def _recording_run(self, *args, grid, warmup, **kwargs):
    rec = _describe(self.fn, args, kwargs)
    key = json.dumps(rec, sort_keys=True)
    if key not in _seen:
        _seen.add(key)
        with open(_path, "a") as f:
            f.write(key + "\n")
    return _run(self, *args, grid=grid, warmup=warmup, **kwargs)


InterpretedFunction.run = _recording_run
""".replace("__DTYPES__", repr(_DTYPES)).replace("__OPTIONS__", repr(_OPTIONS))


def record(script: str, argv: list[str] | tuple = (), timeout: float = 600) -> list[dict]:
    """The distinct kernel launches `script` makes under the interpreter (it must exit 0)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "launches.jsonl"
        env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(
            [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
        r = subprocess.run([sys.executable, "-c", _RECORDER + "\n" + script, str(out), *argv], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            raise AssertionError(f"the script failed under the interpreter:\n{r.stdout}\n{r.stderr}")
        return [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []


def compile_one(rec: dict):
    """Compile one launch record (record()'s form: module, name, signature, constexprs, options) for
    sm_90 and return Triton's compiled kernel; compile errors propagate."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    mod = importlib.import_module(rec["module"])
    fn = getattr(mod, rec["name"], None)
    if fn is None and hasattr(mod, "_build"):  # a kernel its module defines in a factory (kvc.gpu_checksum)
        fn = mod._build()
    while fn is not None and not hasattr(fn, "arg_names") and hasattr(fn, "fn"):  # autotune / heuristics
        fn = fn.fn
    if getattr(fn, "__name__", None) != rec["name"]:
        raise LookupError(f"{rec['module']}.{rec['name']}: not found in its module")
    consts = {(fn.arg_names.index(k),): v for k, v in rec["constexprs"].items()}
    return triton.compile(ASTSource(fn=fn, signature=rec["signature"], constexprs=consts),
                          target=GPUTarget("cuda", 90, 32), options=rec["options"])


def compile_all(records: list[dict]) -> list[str]:
    """Compile each recorded launch for sm_90; the failures, one line each (kernel, error): a
    compile error, or more shared memory than an sm_90 block may use (which the compile accepts
    and the launch refuses: run EL's TMA prefill kernel, 288 KiB)."""
    from engine.moe_kernels import SMEM_BYTES  # what an sm_90 block may use (227 KiB)
    failures = []
    for rec in records:
        if "skip" in rec:
            continue
        try:
            shared = compile_one(rec).metadata.shared
            if shared > SMEM_BYTES:
                raise RuntimeError(f"needs {shared} bytes of shared memory, sm_90 has {SMEM_BYTES}")
        except Exception as e:
            first = str(e).strip().splitlines()
            failures.append(f"{rec['module']}.{rec['name']} {rec['constexprs']}: {type(e).__name__}: "
                            f"{' / '.join(first[-3:]) if first else ''}")
    return failures
