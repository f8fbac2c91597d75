"""The PyTorch peers, timed with CUDA events: a sparse CSR matmul per step in a Python loop, cuDNN's
RNN (torch.nn.RNN), and a dense step loop captured once in a CUDA graph; for the gated suite,
cuDNN's LSTM and GRU (torch.nn.LSTM / nn.GRU).

PyTorch is imported on first use, after JAX has set up the GPU; inputs come from JAX through
DLPack (no copy). A peer that cannot run says why (no torch, no CUDA device, unsupported dtype).
"""

from __future__ import annotations

import functools
import warnings

import numpy as np

from .harness import Peer, Runner, Skip
from .problems import Layer

#: where the PyTorch peers run (a module constant so that a CPU test can point it elsewhere)
DEVICE = "cuda"


@functools.lru_cache(maxsize=None)
def _torch():
    import torch
    return torch


def unavailable() -> str | None:
    try:
        torch = _torch()
    except ImportError:
        return "PyTorch is not installed"
    if not torch.cuda.is_available():
        return f"PyTorch {torch.__version__} sees no CUDA device"
    return None


def _dtype(name: str):
    return getattr(_torch(), name)


def to_torch(a):
    """A JAX array as a torch tensor on the GPU (shared through DLPack, else copied)."""
    torch = _torch()
    try:
        return torch.from_dlpack(a)
    except Exception:  # e.g. a DLPack version mismatch: go through the host
        return torch.from_numpy(np.asarray(a, np.float32)).to(DEVICE, _dtype(str(a.dtype)))


def event_clock(fn, group) -> float:
    """Seconds a call, between CUDA events recorded around the group's calls issued back to back
    (benchmarks.timing: a clock); the GPU idle between launches of a Python loop counts, as it
    would in use."""
    torch = _torch()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for args in group:
        fn(*args)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e-3 / len(group)


def kernel_names(fn, args, top: int = 8) -> dict:
    """The GPU kernels one call launched, by total time, from the PyTorch profiler."""
    torch = _torch()
    try:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn(*args)
            torch.cuda.synchronize()
        events = prof.key_averages()
        total = lambda e: getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        names = [e.key for e in sorted(events, key=total, reverse=True)][:top]
    except Exception as e:  # no CUPTI, or an API change: say so rather than fail the peer
        return dict(kernels_error=f"{type(e).__name__}: {str(e)[:200]}")
    return dict(kernels=[n[:160] for n in names],
                persistent_kernel_seen=any("persist" in n.lower() for n in names))


def _host_kernel(layer: Layer, transpose: bool):
    torch = _torch()
    k = layer.kernel.T if transpose else layer.kernel
    return torch.from_numpy(np.ascontiguousarray(k)).to(DEVICE, _dtype(layer.dtype))


# ---- sparse CSR matmul per step ------------------------------------------------------------------

def _build_csr(layer: Layer, batch: int, T: int) -> Runner:
    torch = _torch()
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        u = _host_kernel(layer, transpose=True).to_sparse_csr()  # U = kernel^T: h^T <- U @ h^T

    def prepare(x, h0):
        xt = to_torch(x).permute(0, 2, 1).contiguous()  # [T, H, B]: the state stays [H, B]
        return xt, to_torch(h0).t().contiguous(), torch.empty_like(xt)

    def run(xt, ht, ys):
        for t in range(T):
            torch.addmm(xt[t], u, ht, out=ys[t])  # cuSPARSE SpMM, fused with the input add
            ht = ys[t].tanh_()
        return ys, ht.t()

    try:  # an unsupported dtype fails here, with PyTorch's message
        probe_args = prepare(torch.zeros(1, batch, layer.hidden, dtype=u.dtype, device=DEVICE),
                             torch.zeros(batch, layer.hidden, dtype=u.dtype, device=DEVICE))
        torch.addmm(probe_args[0][0], u, probe_args[1], out=probe_args[2][0])
    except RuntimeError as e:
        raise Skip(f"torch sparse CSR addmm in {layer.dtype}: {str(e)[:200]}") from e
    return Runner(run=run, prepare=prepare, clock=event_clock,
                  probe=lambda *args: kernel_names(run, args))


# ---- cuDNN ---------------------------------------------------------------------------------------

def cudnn_algo_prediction(hidden: int, batch: int, dtype: str, capability: tuple[int, int],
                          sm_count: int) -> str:
    """The cuDNN algorithm PyTorch's get_algo() asks for, for a one-layer unidirectional tanh RNN
    with input size = hidden on unpacked input (aten/src/ATen/native/cudnn/RNN.cpp, PyTorch 2.x).
    A prediction to compare with the kernels actually seen."""
    major, minor = capability
    if major >= 6 and hidden <= 384:
        return "PERSIST_STATIC_SMALL_H"
    if dtype == "float16" and hidden <= 1024 and hidden % 128 == 0:
        if major == 7 and minor != 5:
            ok = (batch % 16 == 0 and batch not in (80, 112)) or batch == 8
        elif major >= 8 and sm_count >= 98 and minor != 6:
            ok = batch % 8 == 0 and batch <= 128 and (batch < 96 or hidden < 896)
        else:
            ok = False
        if ok:
            return "PERSIST_STATIC"
    return "STANDARD"


def _cudnn_unavailable() -> str | None:
    reason = unavailable()
    if reason is None and not _torch().backends.cudnn.is_available():
        reason = "cuDNN is not available to PyTorch"
    return reason


def _build_cudnn(layer: Layer, batch: int, T: int) -> Runner:
    torch = _torch()
    H = layer.hidden
    rnn = torch.nn.RNN(H, H, nonlinearity="tanh", bias=False, batch_first=False)
    rnn = rnn.to(DEVICE, _dtype(layer.dtype))
    with torch.no_grad():  # x @ W_ih^T with W_ih = I: cuDNN always applies an input projection
        rnn.weight_ih_l0.copy_(torch.eye(H))
        rnn.weight_hh_l0.copy_(_host_kernel(layer, transpose=True))  # h @ W_hh^T = h @ kernel
    rnn.flatten_parameters()

    @torch.no_grad()
    def run(x, h0):
        y, h_n = rnn(x, h0)
        return y, h_n[0]

    props = torch.cuda.get_device_properties(0)
    info = dict(torch_algo_prediction=cudnn_algo_prediction(
        H, batch, layer.dtype, (props.major, props.minor), props.multi_processor_count),
        cudnn_version=torch.backends.cudnn.version(), allow_tf32=torch.backends.cudnn.allow_tf32,
        note="includes cuDNN's input GEMM x @ I (one batched GEMM for all steps)")
    prepare = lambda x, h0: (to_torch(x).contiguous(), to_torch(h0)[None].contiguous())
    return Runner(run=run, prepare=prepare, clock=event_clock, info=info,
                  probe=lambda *args: kernel_names(run, args))


# ---- dense step loop in a CUDA graph -------------------------------------------------------------

def _build_graph(layer: Layer, batch: int, T: int) -> Runner:
    torch = _torch()
    w = _host_kernel(layer, transpose=False)

    def steps(x, h0, ys):
        h = h0
        for t in range(T):
            torch.addmm(x[t], h, w, out=ys[t])  # cuBLAS GEMM with the input add
            h = ys[t].tanh_()

    def prepare(x, h0):
        x, h0 = to_torch(x).contiguous(), to_torch(h0).contiguous()
        ys = torch.empty_like(x)
        side = torch.cuda.Stream()  # warm cuBLAS up outside the capture, as PyTorch requires
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            steps(x, h0, ys)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            steps(x, h0, ys)
        return graph, ys, x, h0  # the graph reads x and h0 in place: keep them alive

    def run(graph, ys, *_):
        graph.replay()
        return ys, ys[-1]

    info = dict(matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32)
    return Runner(run=run, prepare=prepare, clock=event_clock, info=info,
                  probe=lambda *args: kernel_names(run, args))


# ---- cuDNN LSTM and GRU (the gated suite) --------------------------------------------------------

def _host_array(a, dtype: str):
    return _torch().from_numpy(np.ascontiguousarray(a, np.float32)).to(DEVICE, _dtype(dtype))


def _build_cudnn_gated(layer, batch: int, T: int) -> Runner:
    """torch.nn.LSTM / nn.GRU (input size H, batch_first) on the layer's weights: W_ih = w_in^T,
    W_hh = kernel^T (dense), b_ih = bias, b_hh = 0 except the GRU's n block, which is hn_bias
    (PyTorch's GRU multiplies b_hn by the reset gate, as Flax does)."""
    torch = _torch()
    H, lstm = layer.hidden, layer.cell == "lstm"
    rnn = (torch.nn.LSTM if lstm else torch.nn.GRU)(H, H, bias=True, batch_first=True)
    rnn = rnn.to(DEVICE, _dtype(layer.dtype))
    b_hh = np.zeros(layer.gates * H, np.float32)
    if not lstm:
        b_hh[2 * H:] = layer.hn_bias
    with torch.no_grad():
        rnn.weight_ih_l0.copy_(_host_array(layer.w_in.T, layer.dtype))
        rnn.weight_hh_l0.copy_(_host_array(layer.kernel.T, layer.dtype))
        rnn.bias_ih_l0.copy_(_host_array(layer.bias, layer.dtype))
        rnn.bias_hh_l0.copy_(_host_array(b_hh, layer.dtype))
    rnn.flatten_parameters()

    @torch.no_grad()
    def run(xb, h0):
        y, h_n = rnn(xb, (h0, h0) if lstm else h0)
        return y, (h_n[0] if lstm else h_n)[0]

    def prepare(x, h0):  # batch-first copies, outside the timed region
        return to_torch(x).transpose(0, 1).contiguous(), to_torch(h0)[None].contiguous()

    info = dict(cudnn_version=torch.backends.cudnn.version(),
                note="includes cuDNN's input GEMM x @ W_ih (one batched GEMM for all steps)")
    return Runner(run=run, prepare=prepare, clock=event_clock, info=info,
                  probe=lambda *args: kernel_names(run, args))


DTYPES = ("float16", "bfloat16", "float32")
TORCH_CSR = Peer("torch_csr", "torch.sparse_csr_tensor addmm per step in a Python loop (cuSPARSE)",
                 DTYPES, _build_csr, unavailable=unavailable)
CUDNN = Peer("cudnn", "torch.nn.RNN(tanh) through cuDNN, dense weights", DTYPES, _build_cudnn,
             unavailable=_cudnn_unavailable)
CUDA_GRAPH = Peer("cuda_graph", "T dense steps (addmm + tanh) captured in one CUDA graph (PyTorch)",
                  DTYPES, _build_graph, unavailable=unavailable)

PEERS = (TORCH_CSR, CUDNN, CUDA_GRAPH)

CUDNN_GATED = Peer("cudnn", "torch.nn.LSTM / torch.nn.GRU through cuDNN (PyTorch), dense weights, "
                   "input size H, batch_first, input projection included", DTYPES,
                   _build_cudnn_gated, unavailable=_cudnn_unavailable)
#: Not in PEERS: the other suites run the simple cell and never take these.
GATED_PEERS = (CUDNN_GATED,)
