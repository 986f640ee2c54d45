"""Forward-kernel variants (warp specialisation, TMA descriptor loads) and tiles, timed against
the current kernel in one run (BENCHMARKS.md, "How the tile was found"). An experiment, not part
of the library: it rewrites forward.py's source text into variant modules.

    python3 benchmarks/forward_variants.py            # GPU
    TRITON_INTERPRET=1 python benchmarks/forward_variants.py   # CPU: a tiny shape, checks only that it runs
"""
import importlib.util, os, sys, tempfile, time
import torch, triton
sys.path.insert(0, ".")
from flexgr.ops.triton_hstu import launch as L, tuning
from flexgr.ops.triton_hstu.tuning import TileConfig
from flexgr.masks import build_hstu_mask
from flexgr.ops.triton_backend import hstu_attention_triton

SRC = open("flexgr/ops/triton_hstu/forward.py").read()
LOOP = "for t in range(0, num_blocks * SUB):"

def variant(ws: bool, tma: bool) -> str:
    s = SRC
    if ws:
        s = s.replace(LOOP, "for t in tl.range(0, num_blocks * SUB, warp_specialize=True):")
    if tma:
        s = s.replace("""        k = load_rows(
            K + offs_n[:, None] * stride_kt + offs_dk[None, :], row_ok, offs_dk,
            DQK, BLOCK_DQK, IS_FULL,
        )""", """        row0 = blk * MASK_BLOCK_KV + (t % SUB) * BLOCK_N
        k = K.load([row0, 0])""")
        s = s.replace("""        v = load_rows(
            V + offs_n[:, None] * stride_vt + offs_dv[None, :], row_ok, offs_dv,
            DV, BLOCK_DV, IS_FULL,
        )""", """        v = V.load([row0, 0])""")
        s = s.replace("""    Q += head * stride_qh
    K += head * stride_kh
    V += head * stride_vh""", """    Q += head * stride_qh
    K += head * stride_kh
    V += head * stride_vh
    K = tl.make_tensor_descriptor(K, shape=[T, DQK], strides=[stride_kt, 1], block_shape=[BLOCK_N, BLOCK_DQK])
    V = tl.make_tensor_descriptor(V, shape=[T, DV], strides=[stride_vt, 1], block_shape=[BLOCK_N, BLOCK_DV])""")
    assert s.count("warp_specialize") == int(ws) and s.count("make_tensor_descriptor") == 2 * int(tma)
    return s

_GEN = tempfile.mkdtemp(prefix="flexgr_fwd_variants_")


def load(name: str, src: str):
    path = os.path.join(_GEN, f"_fwd_{name}.py")
    open(path, "w").write(src)
    spec = importlib.util.spec_from_file_location(f"_fwd_{name}", path)
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    return mod.hstu_fwd_kernel

dev = "cuda" if torch.cuda.is_available() else "cpu"
triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device=dev))
small = dev == "cpu"
variants = {"base": (False, False), "ws": (True, False), "tma": (False, True), "tma+ws": (True, True)}
only = os.environ.get("VARIANTS")
if only: variants = {k: v for k, v in variants.items() if k in only.split(",")}
kernels = {n: load(n.replace("+", "_"), variant(*f)) for n, f in variants.items()}
cfgs = [TileConfig(128, 128, 8, 2), TileConfig(128, 128, 8, 3), TileConfig(128, 128, 4, 3), TileConfig(128, 64, 4, 3), TileConfig(64, 64, 4, 3)]
if small: cfgs = [TileConfig(32, 32, 4, 2)]
shapes = [(3, 100)] if small else [(16, 4096), (8, 8192)]
H, D = (2, 32) if small else (4, 128)
dt = torch.float32 if small else torch.bfloat16
g = torch.Generator().manual_seed(0)
def bench(fn):
    if small:
        fn(); return 0.0
    from triton.testing import do_bench
    return float(do_bench(fn, warmup=25, rep=200, return_mode="median"))
print(f"{torch.cuda.get_device_name() if not small else 'cpu'} torch {torch.__version__} triton {triton.__version__}")
for B, N in shapes:
    lengths = torch.randint(N // 2, N + 1, (B,), generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(dev)
    T = int(offsets[-1]); pairs = int((lengths * (lengths + 1) // 2).sum())
    q, k, v = (torch.randn(T, H, D, device=dev, dtype=dt) for _ in range(3))
    mask = build_hstu_mask(offsets, block_size=32 if small else 128)
    fwd = lambda: hstu_attention_triton(q, k, v, mask, max_seq_len=N, alpha=D**-0.5)
    ref = None
    base_ms = {}
    for name, kern in kernels.items():
        L.hstu_fwd_kernel = kern
        for cfg in cfgs:
            if cfg.block_m > mask.block_mask.BLOCK_SIZE[0]: continue
            tile = (cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages)
            tuning.force("fwd", cfg)
            try:
                t0 = time.time(); out = fwd(); torch.cuda.synchronize() if not small else None
                first = time.time() - t0
                if ref is None: ref = out.float()
                err = float((out.float() - ref).abs().max())
                ms = bench(fwd)
                if name == "base": base_ms[tile] = ms
                tf = 4 * D * H * pairs / ms / 1e9 if ms else 0
                speed = base_ms.get(tile, float("nan")) / ms if ms else 0
                print(f"| {B}x{N} | {name} | {tile} | {ms:.3f} ms | {tf:.0f} TF/s | vs base same tile {speed:.3f} | err {err:.2e} | first {first:.1f}s |", flush=True)
            except Exception as e:
                print(f"| {B}x{N} | {name} | {tile} | FAIL {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}", flush=True)
tuning.force("fwd", None)
