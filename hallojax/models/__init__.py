"""The backbones, codecs and encoders, one file each (config dataclass, blocks, model, parameter count),
built over the shared blocks in `hallojax.nn`: wan (the Wan DiT with every conditioning mechanism),
wan_vae, echomimic (EchoMimicV3's audio projectors), cogvideox (CogVideoX 1.0/1.5, Hallo3's backbone),
encoders/ (T5, wav2vec2, CLIP vision)."""
