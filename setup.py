"""dvt: Dynamic Vision Transformer for PyTorch and MindSpore, behind one API."""
from setuptools import find_packages, setup

# torch is pinned to the CPU build this project is tested with; a looser requirement lets pip pick a
# multi-GB CUDA build. MindSpore 2.x needs numpy < 2 (with numpy 2 every op fails to import).
TORCH = ["torch==2.13.0"]
MINDSPORE = ["mindspore==2.10.0", "numpy<2"]
# Export (onnx) and the framework-free runtime (onnxruntime). onnx 1.18+ pulls an ml_dtypes that needs
# numpy 2, which MindSpore 2.10 cannot use: these pins import beside torch and MindSpore with numpy 1.26.
ONNX = ["onnx==1.17.0", "onnxruntime==1.32.0", "numpy==1.26.4"]
# The lean serving runtime: run a `dvt export` folder on ONNX Runtime, without onnx, a framework or plots.
ONNXRUNTIME = ["onnxruntime==1.32.0", "numpy==1.26.4"]
# Pictures (`dvt evaluate --plot`, `dvt demo --out`); the rest of dvt imports and runs without it.
PLOTS = ["matplotlib>=3.6"]
# OpenVINO runs the same ONNX export (its own ONNX reader; onnx itself is only needed to export). 2026.4.1
# resolves with numpy 1.26.4 and imports beside torch 2.13 and MindSpore 2.10.
OPENVINO = ["openvino==2026.4.1", "numpy==1.26.4"]
# `dvt serve`: an ASGI app on Starlette, served by uvicorn (h11; no compiled extras).
SERVE = ["starlette==1.10.0", "uvicorn==0.55.0", "numpy==1.26.4"]
# Clients no one here wrote, for the service's tests: Triton's HTTP client speaks the Open Inference Protocol v2.
SERVE_TEST = ["tritonclient[http]==2.73.0"]
# Ray Data / Ray Serve (dvt_core.integrations.ray). pyarrow 22+ needs numpy 2: 21.0.0 imports with numpy 1.26.
RAY = ["ray[data,serve]==2.60.0", "pyarrow==21.0.0", "numpy==1.26.4"]

setup(
    name="dvt",
    version="0.1.0",
    description="Dynamic Vision Transformer (NeurIPS 2021): one API, PyTorch and MindSpore backends, true early exit",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The weights/ folder installs as dvt_weights: no generic top-level name.
    packages=find_packages(include=["dvt_core", "dvt_core.*", "dvt_backends", "dvt_backends.*"]) + ["dvt_weights"],
    package_dir={"dvt_weights": "weights"},
    package_data={"dvt_core": ["assets/*", "*.yaml"], "dvt_weights": ["registry.yaml", "*.safetensors"]},
    data_files=[],
    install_requires=["numpy<2", "pyyaml>=6", "safetensors>=0.4", "tqdm>=4.60", "pillow>=9"],
    extras_require={
        "torch": TORCH,
        "mindspore": MINDSPORE,
        "onnx": ONNX,
        "onnxruntime": ONNXRUNTIME,
        "plots": PLOTS,
        "openvino": OPENVINO,
        "serve": SERVE,
        "ray": RAY + SERVE,
        "serve-test": SERVE + SERVE_TEST,
        # setuptools with its own bdist_wheel: the wheel check builds offline (pip wheel --no-build-isolation);
        # import-linter checks the layers (.importlinter, tests/test_architecture.py)
        "dev": ["pytest>=7", "setuptools>=70.1", "wheel", "import-linter==2.17"],
    },
    entry_points={"console_scripts": ["dvt=dvt_core.cli.main:main"]},
)
