from setuptools import setup

setup(
    name="opensora-fast",
    version="0.1.0",
    description="Triton kernels and a thin model package for Open-Sora 1.2 (STDiT3 + causal 3D VAE)",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["opensora_fast", "opensora_fast.kernels", "opensora_fast.models", "opensora_fast.configs"],
    # kernels/ and configs/ sit at the top of the repository and install inside the package
    package_dir={
        "opensora_fast": "opensora_fast",
        "opensora_fast.kernels": "kernels",
        "opensora_fast.configs": "configs",
    },
    install_requires=[
        # Ranges met by both torch 2.13 (CPU, CI) and the H200 image's torch 2.11 / triton 3.6.
        "torch>=2.5,<2.14",
        "triton>=3.2,<3.9; platform_system == 'Linux'",
        "numpy>=1.24",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "transformers>=4.40",
        "diffusers>=0.27",
        # Open-Sora 1.2's prompt cleaning (opensora_fast.text.preprocess_prompt)
        "ftfy>=6",
        "beautifulsoup4>=4.9",
    ],
    extras_require={
        "video": ["av>=11", "pillow>=9"],
        "plot": ["matplotlib>=3.7"],
        "tensorboard": ["tensorboard>=2.14"],
        "bench": ["pytest-benchmark>=4", "matplotlib>=3.7"],
        # numpy<2: triton 3.6's interpreter fails every tl.dot under numpy 2.
        "dev": [
            "pytest>=7", "pytest-xdist>=3", "pytest-benchmark>=4", "ruff>=0.4", "numpy<2", "av>=11", "pillow>=9",
            "matplotlib>=3.7",
        ],  # fmt: skip
        "profile": ["nvtx>=0.2"],
    },
    entry_points={"console_scripts": ["opensora-fast=opensora_fast.cli:entry"]},
)
