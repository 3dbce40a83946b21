"""Package metadata for megatron_ls."""
from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent


def read_requirements(name: str) -> list:
    """Requirement lines of ``name`` (comments and blank lines dropped)."""
    return [line.strip() for line in (here / name).read_text().splitlines()
            if line.strip() and not line.startswith("#")]


requirements = read_requirements("requirements.txt")

setup(
    name="megatron_ls",
    version="0.1.0",
    description="Megatron-style distributed training for Long-Short Transformer (Transformer-LS) models",
    long_description=(here / "README.md").read_text() if (here / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["megatron_ls", "megatron_ls.*"]),
    py_modules=["pretrain_gpt_ls"],
    python_requires=">=3.10",
    # torch is deliberately not pinned here: an existing install (CPU or CUDA) must be kept as is.
    install_requires=["torch>=2.3"] + requirements,
    # transformers: the Hugging Face export's tests load it (torch is an optional dependency of transformers,
    # so this pin never pulls another torch; scripts/install.sh constrains torch anyway).
    # megatron-core: the reference the data tests compare samples against (its wheels ship the compiled index
    # helpers; x86-64 CPython 3.10-3.13); installed under the torch pin, never replacing torch.
    extras_require={"dev": ["pytest>=8", "pytest-timeout>=2.3", "pytest-xdist>=3.5", "flask>=3.0", "requests>=2.31",
                            "transformers==5.23.0", "megatron-core==0.16.1; platform_machine == 'x86_64'"],
                    "inference": ["flask>=3.0"],  # tools/run_text_generation_server.py
                    "hf": ["transformers==5.23.0"],  # --tokenizer-type HuggingFaceTokenizer
                    "mpi": read_requirements("requirements-mpi.txt")},
    entry_points={
        "console_scripts": [
            "megatron-ls-pretrain-gpt=pretrain_gpt_ls:cli",
        ]
    },
    license="Apache-2.0",
)
