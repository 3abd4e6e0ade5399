"""srcid: Semantic Residual Cross-modal Information Disentanglement.

The Triton kernels live in the top-level ``kernels/`` folder of the repository
and are installed under the unambiguous import path ``srcid.kernels``.
"""
from setuptools import setup

PACKAGES = [
    "srcid",
    "srcid.data",
    "srcid.model",
    "srcid.ops",
    "srcid.train",
    "srcid.eval",
    "srcid.study",
    "srcid.kernels",
]

setup(
    name="srcid",
    version="0.1.0",
    description="Semantic residual cross-modal disentanglement: one discrete codebook shared by audio, video and text",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=PACKAGES,
    package_dir={"srcid.kernels": "kernels"},
    package_data={"srcid.train": ["ds_config_*.json"]},  # the trainer's default DeepSpeed configs
    install_requires=[
        # Minimums only: GPU users bring their own CUDA build of torch.
        # The Makefile pins the CPU build used for development and CI.
        "torch>=2.4",
        "triton>=3.0",
        "deepspeed>=0.15",
        "webdataset>=0.2.90",
        "ninja",
        "numpy>=1.24",
        "tqdm",
        "matplotlib",
        "safetensors>=0.4",
        "tensorboard",
        "h5py",
    ],
    extras_require={
        "dev": ["pytest>=8", "pytest-benchmark>=4", "pytest-timeout", "pytest-xdist>=3"],
    },
    entry_points={"console_scripts": ["srcid=srcid.cli:main"]},
)
