"""hallojax: audio-driven portrait-animation video DiTs in JAX / Flax NNX."""

from setuptools import find_packages, setup

setup(
    name="hallojax",
    version="0.1.0",
    description="Audio-driven portrait-animation video diffusion transformers in JAX/Flax NNX, "
                "sharded over TPU pods and multi-host GPU clusters, with PyTorch converters.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["hallojax", "hallojax.*", "data_pipeline", "data_pipeline.*"]),
    install_requires=[
        "jax>=0.10.0,<0.12",
        "jaxlib>=0.10.0,<0.12",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.5,<0.3",
        "orbax-checkpoint>=0.12.0,<0.13",
        "grain>=0.2.12,<0.3",
        "tensorflow-datasets>=4.9.9,<5",
        "array-record>=0.8.1,<0.9",
        "ml-collections>=1.1.0,<2",
        "safetensors>=0.6,<1",
        "ml-dtypes>=0.5,<0.7",
        "einops>=0.8,<0.9",
        "tqdm>=4.66,<5",
        "tensorboardX>=2.6,<3",  # TensorBoard event files without TensorFlow
        "absl-py>=2.1,<3",
        "av>=14,<19",  # PyAV: video/audio decode and encode (data pipeline)
        "soxr>=0.5,<2",  # audio resampling
        "soundfile>=0.12,<1",
        "pillow>=10,<14",  # portraits for `hallojax generate`
        # face boxes for generation: OpenCV's bundled Haar cascades (4.x ships them; 5.0 does not)
        "opencv-python-headless>=4.9,<5",
        "matplotlib>=3.8,<4",  # plots (lip-sync tracks); its sample data holds the real photograph the tests use
        "pyloudnorm>=0.1.1,<0.3",  # EchoMimicV3 Flash's -23 LUFS speech normalisation (generate's sample.loudness)
        "scikit-image>=0.22,<1",  # PSNR / SSIM in `hallojax eval`
        "numpy>=1.26,<3",
        # tokenizers and wav2vec2 feature extraction (no torch needed; transformers 5 has no Flax models)
        "transformers>=5.0,<6",
        "tokenizers>=0.21,<1",
    ],
    extras_require={
        # torch stays pinned: a range would let a resolver pull a multi-GB CUDA build
        "test": [
            "pytest>=8,<10",
            "pytest-xdist>=3.6,<4",
            "chex>=0.1.90,<0.2",
            "torch==2.13.0",
            "diffusers>=0.35,<0.43",
            "transformers>=5.0,<6",
            "accelerate>=1.10,<2",
            # libtpu: `hallojax compile` and the splash-attention tests compile for TPU topologies on CPU
            "jax[tpu]>=0.10.0,<0.12",
        ],
        "tpu": ["jax[tpu]>=0.10.0,<0.12"],
        "cuda": ["jax[cuda12]>=0.10.0,<0.12"],
    },
    entry_points={"console_scripts": ["hallojax=hallojax.cli:main"]},
)
