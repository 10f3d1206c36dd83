"""CUDA C++ kernels compiled at run time with NVRTC and launched through the driver API.

Shared by the kernels that Triton cannot express (``cuda_mma``, ``cuda_bitserial``): no CUDA toolkit
is needed, only ``libnvrtc`` (which torch's CUDA wheels bring) and the driver. Launches go through
``cuLaunchKernelEx`` so a kernel can be a programmatic dependent launch (PDL) of the one before it.
"""

from __future__ import annotations

import ctypes
import functools
import os

import torch


class NvrtcUnavailable(RuntimeError):
    pass


def _load_first(names: list[str]) -> ctypes.CDLL | None:
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


@functools.cache
def nvrtc() -> ctypes.CDLL:
    names = [os.environ["LITTLEBIT_NVRTC"]] if os.environ.get("LITTLEBIT_NVRTC") else []
    major = (torch.version.cuda or "12").split(".")[0]
    names += [f"libnvrtc.so.{major}", "libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"]
    try:  # the pip package torch's CUDA wheels depend on
        import nvidia.cuda_nvrtc as pkg  # type: ignore[import-not-found]

        lib_dir = os.path.join(list(pkg.__path__)[0], "lib")
        names += [os.path.join(lib_dir, f) for f in sorted(os.listdir(lib_dir)) if f.startswith("libnvrtc.")]
    except (ImportError, OSError, IndexError):
        pass
    lib = _load_first(names)
    if lib is None:
        raise NvrtcUnavailable("NVRTC (libnvrtc.so) was not found; set LITTLEBIT_NVRTC to its path")
    return lib


def compile_cubin(source: str, defines: dict[str, int], arch: int, name: str = "kernel.cu") -> bytes:
    """``source`` after ``#define``s of ``defines``, compiled to a cubin for ``sm_<arch>`` (no GPU needed)."""
    lib = nvrtc()
    prog = ctypes.c_void_p()
    src = "".join(f"#define {k} {v}\n" for k, v in defines.items()) + source
    if lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), name.encode(), 0, None, None):
        raise RuntimeError("nvrtcCreateProgram failed")
    try:
        opts = [f"--gpu-architecture=sm_{arch}".encode(), b"--std=c++17"]
        arr = (ctypes.c_char_p * len(opts))(*opts)
        if lib.nvrtcCompileProgram(prog, len(opts), arr):
            size = ctypes.c_size_t()
            lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetProgramLog(prog, log)
            raise RuntimeError(f"NVRTC failed to compile {name}:\n{log.value.decode()}")
        size = ctypes.c_size_t()
        lib.nvrtcGetCUBINSize(prog, ctypes.byref(size))
        cubin = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetCUBIN(prog, cubin)
        return cubin.raw
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


class _LaunchAttr(ctypes.Structure):
    # CUlaunchAttribute: an id, padding to 8 bytes, a 64-byte value union (here: one int)
    _fields_ = [
        ("id", ctypes.c_int),
        ("pad", ctypes.c_int),
        ("value", ctypes.c_int),
        ("rest", ctypes.c_char * 60),
    ]


class _LaunchConfig(ctypes.Structure):
    _fields_ = [
        ("grid", ctypes.c_uint * 3),
        ("block", ctypes.c_uint * 3),
        ("shared", ctypes.c_uint),
        ("stream", ctypes.c_void_p),
        ("attrs", ctypes.POINTER(_LaunchAttr)),
        ("n_attrs", ctypes.c_uint),
    ]


_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
_PDL_ATTR = _LaunchAttr(id=_PROGRAMMATIC_STREAM_SERIALIZATION, value=1)  # the same for every launch
_MAX_DYNAMIC_SHARED = 8  # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
_SMEM_SET: dict[int, int] = {}  # function handle -> dynamic shared memory it was opened up to


@functools.cache
def libcuda() -> ctypes.CDLL:
    return ctypes.CDLL("libcuda.so.1")


def check(res: int, what: str) -> None:
    if res:
        msg = ctypes.c_char_p()
        libcuda().cuGetErrorString(res, ctypes.byref(msg))
        raise RuntimeError(f"{what} failed: {(msg.value or b'CUDA error').decode()}")


def load_function(cubin: bytes, name: str, device_index: int) -> ctypes.c_void_p:
    """Kernel ``name`` of ``cubin``, loaded into the primary context of the device (kept for good)."""
    with torch.cuda.device(device_index):
        torch.cuda.current_stream().synchronize()  # the primary context is current on this thread
        module = ctypes.c_void_p()
        check(libcuda().cuModuleLoadData(ctypes.byref(module), cubin), "cuModuleLoadData")
        func = ctypes.c_void_p()
        check(libcuda().cuModuleGetFunction(ctypes.byref(func), module, name.encode()), "cuModuleGetFunction")
    return func


def launch(
    func: ctypes.c_void_p, grid: tuple[int, int], threads: int, shared: int, args: list, device: torch.device,
    pdl: bool,
) -> None:  # fmt: skip
    """Launch ``func`` on the current stream; ``args``: ctypes values in the kernel's parameter order."""
    argv = (ctypes.c_void_p * len(args))(*[ctypes.cast(ctypes.byref(a), ctypes.c_void_p) for a in args])
    cfg = _LaunchConfig()
    cfg.grid[:] = [grid[0], grid[1], 1]
    cfg.block[:] = [threads, 1, 1]
    cfg.shared = shared
    if shared > 48 * 1024 and _SMEM_SET.get(func.value or 0, 0) < shared:
        check(libcuda().cuFuncSetAttribute(func, _MAX_DYNAMIC_SHARED, shared), "cuFuncSetAttribute")
        _SMEM_SET[func.value or 0] = shared
    cfg.stream = ctypes.c_void_p(torch.cuda.current_stream(device).cuda_stream)
    cfg.attrs = ctypes.pointer(_PDL_ATTR) if pdl else None
    cfg.n_attrs = 1 if pdl else 0
    check(libcuda().cuLaunchKernelEx(ctypes.byref(cfg), func, argv, None), "cuLaunchKernelEx")


def ptr(t: torch.Tensor | None) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr() if t is not None else 0)
