
import time, torch, triton, triton.language as tl

@triton.jit
def store_far(ptr):
    tl.store(ptr + (1 << 40), 1.0)

x = torch.zeros(16, device="cuda")
torch.cuda.synchronize()
try:
    store_far.warmup(x, grid=(1,))
except Exception as exc:  # an older or newer Triton: it compiles at the launch instead
    print("warmup failed", type(exc).__name__, exc, flush=True)
print("launching", time.time(), flush=True)
try:
    store_far[(1,)](x)
    torch.cuda.synchronize()
    print("no fault", time.time(), flush=True)
except Exception as exc:
    print("fault", time.time(), type(exc).__name__, str(exc)[:300], flush=True)
    raise
