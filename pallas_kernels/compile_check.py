"""Static GPU compile check of the Pallas-Triton kernels, on a machine without a GPU (docs/compile_check.md).

For every kernel variant `sparse_mla_decode` can launch, and the forward / dQ / dKV kernels of `sparse_attention` at
V4's shapes (compile_check_sparse.py), the kernel is lowered for CUDA on the CPU; the Triton IR
that jax embeds in the lowered module is compiled by the standalone `triton` package for sm_90a and sm_100a to PTX
and cubin (ptxas needs no GPU), and ptxas's report gives registers, spills and stack per thread; Triton's metadata
gives the shared memory, the PTX whether tensor-core instructions (wgmma on sm_90a, tcgen05 on sm_100a) were
emitted. A GPU build compiles with XLA's bundled Triton, not this one: the figures are a proxy.

jax embeds the IR as MLIR bytecode in the backend config of a `__gpu$xla.gpu.triton` custom call (jax 0.10.2 and
0.12.0.1 both; a jax that embeds it otherwise gets a CompileCheckError). It is printed as text with jax's own MLIR
(Triton's parser rejects the bytecode of jax's newer MLIR) and parsed back by Triton.

Letters: as in triton_decode.py.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import io
import math
import multiprocessing
import pathlib
import re
import tempfile
import time
from typing import ClassVar

import jax
import jax.numpy as jnp

from pallas_kernels import cache_shape, get_format
from pallas_kernels.triton_decode import d_chunk_for, sparse_mla_decode_triton

ARCHS = {"sm_90a": 90, "sm_100a": 100}
# The Hopper / Blackwell tensor-core instruction; M = 16 or 32 head blocks fall back to mma.sync (wgmma needs M 64).
TENSOR_CORE_PTX = {"sm_90a": "wgmma.mma_async", "sm_100a": "tcgen05.mma"}
# Largest dynamic shared memory one block may opt into: 227 KiB on Hopper (sm_90) and Blackwell (sm_100).
SMEM_LIMIT_BYTES = 232448
KV_FORMATS = ("model1", "v32")
HEADS = (16, 32, 64, 128)
TRITON_CUSTOM_CALL = "__gpu$xla.gpu.triton"


class CompileCheckError(RuntimeError):
    """The IR could not be captured (unsupported jax) or Triton is missing."""


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """One decode kernel variant: cache format, query heads (head block min(h_q, 64)), split-KV or not, with or
    without the extra cache scope, and a cache over 4 GiB (64-bit element offsets).

    What `check_matrix` asks of a configuration (compile_check_sparse.AttentionConfig answers the same): `name`,
    `family`, `block_h` (M of the logit matmul), `spill_budget`, `d_chunk(arch, forced)` and `capture(d_chunk)`."""

    kv_format: str
    h_q: int
    split: bool
    extra: bool
    large_cache: bool = False
    family: ClassVar[str] = "sparse_mla_decode"

    @property
    def name(self) -> str:
        parts = [self.kv_format, f"h{self.h_q}", "split" if self.split else "nosplit"]
        return "-".join(parts + (["extra"] if self.extra else []) + (["5GiB"] if self.large_cache else []))

    @property
    def block_h(self) -> int:
        return min(self.h_q, 64)

    @property
    def spill_budget(self) -> int:
        return SPILL_BUDGET_BYTES

    def d_chunk(self, arch: str, forced: int | None = None) -> int:
        """The V-column chunk compiled for `arch`: `forced`, else what a GPU of that architecture picks."""
        return forced or arch_d_chunk(arch, self.block_h)

    def capture(self, d_chunk: int) -> KernelIR:
        return capture_ir(self, d_chunk)[0]


def configurations() -> list[KernelConfig]:
    """Every decode variant: formats × h_q 16/32/64/128 × split or not × extra scope or not, plus caches over 4 GiB
    (the benchmark's peak V3.2 case has 3.2 GB; larger ones switch Pallas to 64-bit offsets). The sparse-attention
    kernels: compile_check_sparse.configurations(); both: compile_check_sparse.all_configurations()."""
    out = [KernelConfig(f, h, s, x) for f in KV_FORMATS for h in HEADS for s in (False, True) for x in (False, True)]
    return out + [KernelConfig(f, 128, True, False, large_cache=True) for f in KV_FORMATS]


# The test compiles these (the full matrix takes minutes): MODEL1's production shape (CONFIG2: h_q 128, split, extra
# scope), the variant with the most spills on both architectures (V3.2, two scopes, no split), and a head block of
# 32 (the mma.sync path).
REPRESENTATIVE = ("model1-h128-split-extra", "v32-h64-nosplit-extra", "model1-h32-nosplit")


@dataclasses.dataclass(frozen=True)
class KernelIR:
    name: str
    ttir: str  # Triton IR as text
    num_warps: int
    num_stages: int
    grid: tuple[int, int, int]


@dataclasses.dataclass(frozen=True)
class CompileStats:
    arch: str
    registers: int
    spill_store_bytes: int
    spill_load_bytes: int
    stack_bytes: int
    shared_bytes: int  # dynamic shared memory Triton allocates (ptxas's static 1 KiB is reserved by the system)
    mma: str  # matrix instruction in the PTX: "wgmma" (sm_90a) / "tcgen05" (sm_100a), else "mma.sync" or "none"
    trap: bool  # a `trap` instruction in the PTX (Triton emits a bare trap for a path it cannot compile)
    ptx_lines: int
    seconds: float


def cuda_lowering_context():
    """jax >= 0.11 asks the (abstract) device for its GPU kind; jax 0.10 assumes sm_90 when there is no GPU."""
    if jax.__version_info__ < (0, 11) or jax.default_backend() == "gpu":
        return contextlib.nullcontext()
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
    return jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=device))


def lower_for_cuda(fn, *specs):
    """jax.jit(fn) lowered for CUDA on whatever machine this is."""
    with cuda_lowering_context():
        return jax.jit(fn).trace(*specs).lower(lowering_platforms=("cuda",))


def arch_d_chunk(arch: str, block_h: int) -> int:
    """The V-column chunk `sparse_mla_decode` picks on a GPU of this architecture."""
    cap = ARCHS[arch]
    return d_chunk_for(f"{cap // 10}.{cap % 10}", block_h)


def _launch_specs(cfg: KernelConfig, d_chunk: int):
    """(function, input specs) launching `cfg` the way sparse_mla_decode's kernel path does: b 2, s_q 2, top-k 512
    (main) and 256 (extra), MODEL1 pages of 256 main / 64 extra tokens and V3.2 pages of 64 (the benchmark's)."""
    kv_format = get_format(cfg.kv_format)
    b, s_q, page, extra_page = 2, 2, (256 if cfg.kv_format == "model1" else 64), 64
    # A cache over 4 GiB: Pallas switches the whole-array ref to 64-bit offsets.
    num_blocks = (5 << 30) // math.prod(cache_shape(1, page, kv_format)) if cfg.large_cache else 64
    spec = jax.ShapeDtypeStruct
    specs = [spec((b, s_q, cfg.h_q, kv_format.d_qk), jnp.bfloat16), spec(cache_shape(num_blocks, page, kv_format),
             jnp.uint8), spec((b, s_q, 512), jnp.int32), spec((b,), jnp.int32), spec((cfg.h_q,), jnp.float32)]
    if cfg.extra:
        specs += [spec(cache_shape(256, extra_page, kv_format), jnp.uint8), spec((b, s_q, 256), jnp.int32),
                  spec((b,), jnp.int32)]

    def launch(q, cache, idx, length, sink, *x):
        scope = dict(extra_kv_cache=x[0], extra_idx_btk=x[1], extra_page_size=extra_page,
                     extra_topk_length_b=x[2]) if x else {}
        return sparse_mla_decode_triton(q, cache, idx, kv_format=kv_format, page_size=page, topk_length_b=length,
                                        attn_sink_n=sink, softmax_scale=kv_format.d_qk ** -0.5,
                                        num_splits=2 if cfg.split else 1, d_chunk=d_chunk, **scope)

    return launch, specs


def capture_ir(cfg: KernelConfig, d_chunk: int) -> list[KernelIR]:
    """The Triton kernels (one) of `cfg`'s launch with V-column chunk `d_chunk` (`arch_d_chunk(arch)` is what a GPU
    of that architecture runs), lowered for CUDA on the CPU."""
    fn, specs = _launch_specs(cfg, d_chunk)
    return triton_kernels(lower_for_cuda(fn, *specs))


def triton_kernels(lowered) -> list[KernelIR]:
    """The Pallas-Triton kernels inside a `Lowered` (jax.jit(...).lower(lowering_platforms=("cuda",)))."""
    from jax._src.lib.mlir import ir  # jax's MLIR bindings (no public path)

    module = lowered.compiler_ir("stablehlo")
    calls = []

    def walk(op):
        for region in op.regions:
            for block in region.blocks:
                for child in block.operations:
                    if child.operation.name == "stablehlo.custom_call":
                        calls.append(child.operation)
                    walk(child.operation)

    walk(module.operation)
    targets = {ir.StringAttr(c.attributes["call_target_name"]).value for c in calls}
    kernels = []
    for call in calls:
        if ir.StringAttr(call.attributes["call_target_name"]).value != TRITON_CUSTOM_CALL:
            continue
        config = ir.DictAttr(call.attributes["mhlo.backend_config"])
        value = lambda key, config=config: ir.IntegerAttr(config[key]).value  # noqa: E731
        kernels.append(KernelIR(name=ir.StringAttr(config["name"]).value,
                                ttir=_bytecode_to_text(ir.StringAttr(config["ir"]).value_bytes),
                                num_warps=value("num_warps"), num_stages=value("num_stages"),
                                grid=(value("grid_x"), value("grid_y"), value("grid_z"))))
    if not kernels:
        raise CompileCheckError(
            f"no {TRITON_CUSTOM_CALL} custom call in the lowered module (custom calls: {sorted(targets)}); jax "
            f"{jax.__version__} may embed Pallas-Triton kernels differently (the check reads the form of jax 0.10.2 "
            "to 0.12.0.1)")
    return kernels


def _bytecode_to_text(bytecode: bytes) -> str:
    from jax._src.interpreters import mlir
    from jax._src.lib.mlir import ir
    from jax._src.lib.triton import dialect as tt_dialect

    context = mlir.make_ir_context()
    tt_dialect.register_dialect(context)
    context.load_all_available_dialects()
    with context:
        return ir.Module.parse(bytecode).operation.get_asm(enable_debug_info=False)


_PTXAS_STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")


def compile_kernel(kernel: KernelIR, arch: str, keep_dir: pathlib.Path | None = None) -> CompileStats:
    """Compiles one kernel's IR with the `triton` package for `arch` ("sm_90a" / "sm_100a") through PTX to cubin.

    A compile error propagates (Triton's own exception). `keep_dir`: also write the .ttir, .ptx and .cubin there.
    """
    try:
        import triton
        from triton.backends.compiler import GPUTarget
    except ImportError as e:
        raise CompileCheckError("the compile check needs the `triton` package: pip install -e '.[test]'") from e
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        src = pathlib.Path(tmp) / f"{kernel.name}.ttir"
        src.write_text(kernel.ttir)
        log = io.StringIO()
        # A private cache: every call really compiles (the ptxas report is printed only when ptxas runs).
        with _triton_knobs(triton, tmp), contextlib.redirect_stdout(log):
            compiled = triton.compile(str(src), target=GPUTarget("cuda", ARCHS[arch], 32),
                                      options=dict(num_warps=kernel.num_warps, num_stages=kernel.num_stages))
    seconds = time.perf_counter() - start
    report, ptx = log.getvalue(), compiled.asm["ptx"]
    stack, regs = _PTXAS_STACK.search(report), _PTXAS_REGS.search(report)
    if not stack or not regs:
        raise CompileCheckError(f"no ptxas report for {kernel.name} on {arch}; Triton printed:\n{report[-2000:]}")
    if keep_dir is not None:
        keep_dir.mkdir(parents=True, exist_ok=True)
        stem = keep_dir / f"{kernel.name}.{arch}"
        pathlib.Path(f"{stem}.ttir").write_text(kernel.ttir)
        pathlib.Path(f"{stem}.ptx").write_text(ptx)
        pathlib.Path(f"{stem}.cubin").write_bytes(compiled.asm["cubin"])
    return CompileStats(
        arch=arch, registers=int(regs.group(1)), stack_bytes=int(stack.group(1)),
        spill_store_bytes=int(stack.group(2)), spill_load_bytes=int(stack.group(3)),
        shared_bytes=int(compiled.metadata.shared), mma=_matrix_instruction(ptx, arch),
        trap=re.search(r"^\s*trap;", ptx, re.M) is not None,
        ptx_lines=ptx.count("\n"), seconds=round(seconds, 2))


def _matrix_instruction(ptx: str, arch: str) -> str:
    if TENSOR_CORE_PTX[arch] in ptx:
        return TENSOR_CORE_PTX[arch].split(".")[0]
    return "mma.sync" if "mma.sync" in ptx else "none"


@contextlib.contextmanager
def _triton_knobs(triton, cache_dir: str):
    knobs = triton.knobs
    saved = knobs.cache.dir, knobs.nvidia.dump_ptxas_log
    knobs.cache.dir, knobs.nvidia.dump_ptxas_log = cache_dir, True
    try:
        yield
    finally:
        knobs.cache.dir, knobs.nvidia.dump_ptxas_log = saved


# Decode spill budget per thread (ptxas's static spill-store bytes): a regression guard, not a performance goal; the
# worst variant spills 1.7 KB today (two scopes: two copies of the tile loop). docs/compile_check.md §3 says why.
SPILL_BUDGET_BYTES = 2048


def problems(cfg, stats: CompileStats, spill_budget: int | None = None) -> list[str]:
    """What makes a compiled kernel unacceptable: shared memory over the limit, spills over the budget (default: the
    config family's), a trap, or matmuls off the tensor cores (a head block of 64 must get wgmma / tcgen05; smaller
    ones get mma.sync)."""
    out, name = [], f"{cfg.name} {stats.arch}"
    spill_budget = cfg.spill_budget if spill_budget is None else spill_budget
    if stats.shared_bytes > SMEM_LIMIT_BYTES:
        out.append(f"{name}: {stats.shared_bytes} B shared memory > {SMEM_LIMIT_BYTES} B")
    if stats.spill_store_bytes > spill_budget:
        out.append(f"{name}: {stats.spill_store_bytes} B spill stores per thread > budget {spill_budget} B")
    if stats.trap:
        out.append(f"{name}: the PTX contains a trap")
    want = TENSOR_CORE_PTX[stats.arch].split(".")[0] if cfg.block_h >= 64 else "mma.sync"
    if stats.mma != want:
        out.append(f"{name}: the matmuls compiled to {stats.mma}, expected {want}")
    return out


def _compile_or_error(kernel: KernelIR, arch: str, keep_dir: pathlib.Path | None):
    try:
        return compile_kernel(kernel, arch, keep_dir), None
    except CompileCheckError:
        raise
    except Exception as e:  # a compile error is a result to record, not the end of the matrix
        return None, f"{type(e).__name__}: {str(e)[-1500:]}"


def check_matrix(configs: list, archs: list[str], *, jobs: int = 1, d_chunk: int | None = None,
                 keep_dir: pathlib.Path | None = None, spill_budget: int | None = None,
                 progress=None) -> list[dict]:
    """Captures and compiles every (config, arch): one record each with the family, the config, d_chunk (None where
    the kernel has none), warps, stages, the spill budget, the `CompileStats` fields (or `error`) and `problems`.
    d_chunk: force one decode chunk (default: each arch's choice); spill_budget: one budget for every family
    (default: each family's). jobs: compiles in parallel (spawned processes); progress: called with each record."""
    chunk = {(cfg.name, arch): cfg.d_chunk(arch, d_chunk) for cfg in configs for arch in archs}
    kernels = {(cfg.name, c): cfg.capture(c) for cfg in configs for c in
               sorted({chunk[cfg.name, arch] for arch in archs}, key=str)}
    pool = concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"))
    records = []
    with pool:
        futures = {pool.submit(_compile_or_error, kernels[cfg.name, chunk[cfg.name, arch]], arch,
                               keep_dir / cfg.name if keep_dir else None): (cfg, arch)
                   for cfg in configs for arch in archs}
        for future in concurrent.futures.as_completed(futures):
            cfg, arch = futures[future]
            kernel, (stats, error) = kernels[cfg.name, chunk[cfg.name, arch]], future.result()
            budget = cfg.spill_budget if spill_budget is None else spill_budget
            rec = {"kernel": cfg.name, "family": cfg.family, **dataclasses.asdict(cfg), "block_h": cfg.block_h,
                   "d_chunk": chunk[cfg.name, arch], "num_warps": kernel.num_warps,
                   "num_stages": kernel.num_stages, "arch": arch, "spill_budget_bytes": budget}
            if stats is None:
                rec.update(error=error, problems=[f"{cfg.name} {arch}: compile error: {error.splitlines()[0]}"])
            else:
                rec.update({k: v for k, v in dataclasses.asdict(stats).items() if k != "arch"},
                           problems=problems(cfg, stats, budget))
            records.append(rec)
            if progress:
                progress(rec)
    order = {(cfg.name, arch): i for i, (cfg, arch) in enumerate((c, a) for c in configs for a in archs)}
    return sorted(records, key=lambda r: order[r["kernel"], r["arch"]])
