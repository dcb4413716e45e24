"""Builds bnao and its compiled core ``bnao._C``.

Switches (environment variables), printed at build time:
  BNAO_CUDA=auto|0|1     CUDA kernels: auto builds them when torch has CUDA and
                         nvcc is found; 1 requires them; 0 skips them.
  BNAO_NO_EXTENSION=1    install the pure-PyTorch package only.
  TORCH_CUDA_ARCH_LIST   GPU targets (default "8.0;9.0+PTX" when no GPU is visible: machine code for
                         A100 and H100, PTX that newer GPUs compile at load time).
  MAX_JOBS               parallel compile jobs (ninja).

Without a working C++ compiler (and BNAO_CUDA != 1) the build still succeeds:
bnao then runs on its pure-PyTorch reference kernels and says so once at import.
Under BNAO_CUDA=auto a failed CUDA compile is retried as a CPU-only build, so
the compiled CPU kernels are kept.
"""

import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def log(msg):
    print(f"[bnao setup] {msg}", flush=True)


def collect_sources():
    """C++ sources always; CUDA sources only for a CUDA build (a CPU build never sees .cu)."""
    cpp = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/*/cpu/*.cpp"))
    cu = sorted(glob.glob("csrc/*/cuda/*.cu") + glob.glob("csrc/*/cuda/*.cpp"))
    return cpp, cu


# Without a visible GPU: sm_80 (A100) and sm_90 (H100) machine code plus sm_90 PTX, which the driver
# compiles for newer GPUs at load time.
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"


def cuda_decision(torch, cpp_extension):
    mode = os.environ.get("BNAO_CUDA", "auto").lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"BNAO_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return False, "BNAO_CUDA=0"
    reasons = []
    if torch.version.cuda is None:
        reasons.append("torch is a CPU-only build")
    if cpp_extension.CUDA_HOME is None or not os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")):
        reasons.append(f"nvcc not found (CUDA_HOME={cpp_extension.CUDA_HOME}; export CUDA_HOME=/usr/local/cuda)")
    if reasons:
        if mode == "1":
            raise SystemExit("BNAO_CUDA=1 but CUDA kernels cannot be built: " + "; ".join(reasons))
        return False, "; ".join(reasons)
    return True, f"nvcc at {cpp_extension.CUDA_HOME}, torch CUDA {torch.version.cuda}"


def private_static_libs():
    """Link flags that keep code copied from static archives private to bnao._C (GNU linkers on Linux).

    Some toolchains (e.g. a gcc whose libstdc++ is linked statically) copy libstdc++ into the extension.
    Python's LDSHARED adds -Bsymbolic-functions, so the copy's functions bind inside bnao._C while its
    data (locale facet ids) binds to the process's libstdc++.so: formatting a number in an error message
    then crashed (seen on a GPU machine with /opt/gcc). Hidden, the copy is used whole and consistently.
    """
    return ["-Wl,--exclude-libs,ALL"] if sys.platform.startswith("linux") else []


def openmp_decision(torch):
    """(use OpenMP, why). at::parallel_for, which runs the CPU kernels, is inline code: compiled without
    -fopenmp in a torch that uses OpenMP it runs every loop on one thread. The extension then links the same
    libgomp.so.1 that torch loads (one OpenMP runtime in the process). BNAO_OPENMP=0 turns it off."""
    if os.environ.get("BNAO_OPENMP", "auto").lower() in ("0", "off", "false", "no"):
        return False, "BNAO_OPENMP=0"
    if not sys.platform.startswith("linux"):
        return False, f"only set up for Linux compilers, this is {sys.platform}"
    if "OpenMP" not in torch.__config__.parallel_info():
        return False, "torch was not built with OpenMP"
    return True, "torch runs its CPU ops on OpenMP; at::parallel_for needs -fopenmp to"


def make_extensions():
    if os.environ.get("BNAO_NO_EXTENSION") == "1":
        log("BNAO_NO_EXTENSION=1: pure-PyTorch install")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        log("torch is not importable at build time: pure-PyTorch install (use --no-build-isolation)")
        return [], {}

    with_cuda, why = cuda_decision(torch, cpp_extension)
    if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        if not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
    cpp, cu = collect_sources()
    sources = cpp + (cu if with_cuda else [])
    debug = os.environ.get("BNAO_DEBUG") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # No -std flag: torch.utils.cpp_extension picks the standard its headers need.
    openmp, openmp_why = openmp_decision(torch)
    extra = {"cxx": opt + ["-fvisibility=hidden"] + (["-fopenmp"] if openmp else [])}
    link = (["-fopenmp"] if openmp else []) + private_static_libs()

    def cpu_only_extension():
        # The fallback after a failed CUDA compile: the same C++ sources, no .cu, no CUDA macro.
        return cpp_extension.CppExtension("bnao._C", cpp, include_dirs=[os.path.join(ROOT, "csrc")],
                                          extra_compile_args={"cxx": list(extra["cxx"])}, extra_link_args=link)

    macros = []
    if with_cuda:
        extra["nvcc"] = opt + ["--expt-relaxed-constexpr", "-lineinfo"]
        macros.append(("BNAO_WITH_CUDA", "1"))
    log(f"torch {torch.__version__} (CUDA {torch.version.cuda}), python {sys.version.split()[0]}")
    log(f"CUDA kernels: {'yes' if with_cuda else 'no'} ({why})")
    if with_cuda:
        log(f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST')}")
    log(f"CPU kernels on several threads (OpenMP): {'yes' if openmp else 'no'} ({openmp_why})")
    log(f"MAX_JOBS={os.environ.get('MAX_JOBS', '(ninja default)')}, debug={debug}")
    log(f"sources: {', '.join(sources)}")

    ext_cls = cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension
    ext = ext_cls(
        "bnao._C",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=macros,
        extra_compile_args=extra,
        extra_link_args=link,
    )
    build_info = {"cuda": with_cuda, "arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST", "") if with_cuda else "",
                  "openmp": openmp}
    cuda_required = os.environ.get("BNAO_CUDA", "auto").lower() == "1"
    build_ext = soft_build_ext(cpp_extension.BuildExtension, cuda_required, build_info,
                               cpu_only_extension if with_cuda else None)
    return [ext], {"build_ext": build_ext}


def soft_build_ext(base, cuda_required, build_info, cpu_fallback=None, root=ROOT):
    """BuildExtension that records build flags and survives compiler failures where allowed.

    A failed CUDA build is retried CPU-only (``cpu_fallback()`` builds that extension) unless
    BNAO_CUDA=1; a failed CPU build leaves the pure-PyTorch package unless BNAO_REQUIRE_EXTENSION=1.
    The build flags that took effect go to ``<root>/bnao/_build_info.json``.
    """

    class SoftBuildExt(base.with_options(use_ninja=True)):
        def run(self):
            try:
                super().run()
            except Exception as err:  # noqa: BLE001 - any compiler failure has a fallback
                if cuda_required or (cpu_fallback is None and os.environ.get("BNAO_REQUIRE_EXTENSION") == "1"):
                    raise
                if cpu_fallback is not None:
                    log(f"WARNING: compiling the CUDA kernels failed ({err}); retrying without them")
                    self._retry_cpu_only()
                else:
                    log(f"WARNING: building bnao._C failed ({err}); bnao will run on its pure-PyTorch kernels")
            self._write_build_info()

        def _retry_cpu_only(self):
            self.extensions = [cpu_fallback()]
            self.distribution.ext_modules = self.extensions
            build_info.update(cuda=False, arch_list="", cuda_failed=True)
            try:
                super().run()
            except Exception as err:  # noqa: BLE001
                if os.environ.get("BNAO_REQUIRE_EXTENSION") == "1":
                    raise
                log(f"WARNING: building bnao._C failed ({err}); bnao will run on its pure-PyTorch kernels")

        def _write_build_info(self):
            import json

            info = dict(build_info)
            info["torch"] = __import__("torch").__version__
            target = os.path.join(root, "bnao", "_build_info.json")
            with open(target, "w") as fh:
                json.dump(info, fh)
            if not self.inplace:
                dst = os.path.join(self.build_lib, "bnao", "_build_info.json")
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                with open(dst, "w") as fh:
                    json.dump(info, fh)

    return SoftBuildExt


ext_modules, cmdclass = make_extensions()
setup(
    # The presets live in the top-level configs/ folder and install as bnao/configs.
    packages=find_packages(include=["bnao", "bnao.*"]) + ["bnao.configs"],
    package_dir={"bnao.configs": "configs"},
    package_data={"bnao.configs": ["*.yaml", "rank/*.yaml"], "bnao": ["_build_info.json"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
