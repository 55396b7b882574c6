"""vcr1: fast GRPO fine-tuning of video multimodal LLMs (a re-creation of VideoChat-R1)."""
from setuptools import setup

# torch and torchcodec are left unpinned here so GPU users keep their CUDA builds;
# scripts/setup.sh pins the CPU builds (torch 2.13.0, torchcodec 0.13.0) on machines without a GPU.
setup(
    name="vcr1",
    version="0.1.0",
    description="Fast, exact GRPO trainer for video LLMs (VideoChat-R1 re-creation)",
    python_requires=">=3.10",
    packages=["vcr1", "vcr1.data", "vcr1_kernels"],
    package_dir={"vcr1": "vcr1", "vcr1_kernels": "kernels"},
    install_requires=[
        "torch>=2.6",
        "torchcodec>=0.13",
        "triton>=3.2; platform_system == 'Linux'",
        "transformers>=4.57",
        "tokenizers>=0.21",
        "safetensors",
        "pyyaml",
        "numpy",
        "pillow",
        "deepspeed>=0.16",
        "tensorboard",
        "matplotlib",
        "nvtx",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-benchmark>=4", "liger-kernel>=0.6"],
        "bench": ["pytest-benchmark>=4", "liger-kernel>=0.6"],
        "wandb": ["wandb"],
        "flash": ["flash-attn>=2.6"],
    },
)
