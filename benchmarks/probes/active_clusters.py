"""How many thread-block clusters of N CTAs the GPU holds at once, one CTA per SM (the persistent
kernel's occupancy), for N = 1..16: what ``jax_sprnn.cost.cluster_replicas`` estimates and the
handler asks ``cudaOccupancyMaxActiveClusters`` for.

    python benchmarks/probes/active_clusters.py [--threads 512,608,768] [--out FILE.json]

A cluster's CTAs must share one GPC, so the count is set by how the SMs are spread over the GPCs,
not by ``sm_count // N``. A trivial kernel (compiled by CuPy) asks for more than half an SM's shared
memory, so at most one of its CTAs fits an SM, as with the persistent kernel. The driver's
``cuOccupancyMaxActiveClusters`` is called through ctypes: neither CuPy nor JAX exposes it.
"""
from __future__ import annotations

import argparse
import ctypes
import json

import cupy

_SRC = r"""
extern "C" __global__ void one_cta_per_sm(float* out) {
  extern __shared__ float smem[];
  if (out) out[threadIdx.x] = smem[threadIdx.x];
}
"""
CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8
CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED = 14
CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION = 4


class _AttrValue(ctypes.Union):
    _fields_ = [("pad", ctypes.c_char * 64), ("cluster_dim", ctypes.c_uint * 3)]


class _LaunchAttr(ctypes.Structure):
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", _AttrValue)]


class _LaunchConfig(ctypes.Structure):
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3),
                ("shared_mem_bytes", ctypes.c_uint), ("stream", ctypes.c_void_p),
                ("attrs", ctypes.POINTER(_LaunchAttr)), ("num_attrs", ctypes.c_uint)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", default="128,512,608,768")
    ap.add_argument("--out")
    args = ap.parse_args()
    driver = ctypes.CDLL("libcuda.so.1")
    props = cupy.cuda.runtime.getDeviceProperties(0)
    smem = props["sharedMemPerBlockOptin"] // 2 + 1024  # two CTAs never fit one SM
    kernel = cupy.RawKernel(_SRC, "one_cta_per_sm")
    handle = ctypes.c_void_p(kernel.kernel.ptr)  # the compiled cupy.cuda.Function's CUfunction

    def check(rc, what):
        if rc:
            raise RuntimeError(f"{what} failed: CUresult {rc}")

    check(driver.cuFuncSetAttribute(handle, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem),
          "cuFuncSetAttribute(max dynamic shared memory)")
    check(driver.cuFuncSetAttribute(handle, CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED, 1),
          "cuFuncSetAttribute(non-portable cluster size)")
    table = {}
    for threads in (int(t) for t in args.threads.split(",")):
        row = {}
        for n in range(1, 17):
            attr = _LaunchAttr(id=CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION)
            attr.value.cluster_dim[:] = (n, 1, 1)
            cfg = _LaunchConfig(grid=(ctypes.c_uint * 3)(n, 1, 1), block=(ctypes.c_uint * 3)(threads, 1, 1),
                                shared_mem_bytes=smem, attrs=ctypes.pointer(attr), num_attrs=1)
            count = ctypes.c_int(0)
            rc = driver.cuOccupancyMaxActiveClusters(ctypes.byref(count), handle, ctypes.byref(cfg))
            row[n] = count.value if rc == 0 else f"CUresult {rc}"
        table[threads] = row
        print(f"{threads:4d} threads:", " ".join(f"{n}:{c}" for n, c in row.items()))
    result = dict(device=props["name"].decode(), sm_count=props["multiProcessorCount"],
                  smem_per_cta=smem, active_clusters=table)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
