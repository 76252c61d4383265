"""`hallojax generate` with VP models: a v-prediction checkpoint sampled with the stochastic CogVideoX
DPM-Solver++(2M) and an ε + learned-variance one with respaced ancestral DDPM, under audio guidance (the
variance half is not extrapolated); the noise is a function of the seed; flow samplers are refused."""

import numpy as np
import pytest

from hallojax.generate import Pipeline
from test_generate import media, write_workdir  # noqa: F401  (the module fixture)


@pytest.mark.parametrize("model,sampler", [(dict(prediction="v"), "cogvideox-dpm"),
                                           (dict(prediction="epsilon", learned_variance=True), "ddpm")])
def test_vp_models_generate(model, sampler, media, tmp_path):  # noqa: F811
    pipe = Pipeline.load(write_workdir(tmp_path / "ckpt", seed=3, **model))
    kw = dict(sampler=sampler, steps=3, shift=1.0, guidance="audio=2", progress=False)
    a = pipe.generate(media["image"], media["audio"], seed=0, **kw)
    n = round(media["seconds"] * 25)
    assert a.frames.shape == (n, 32, 32, 3) and a.settings["sampler"] == sampler
    assert all(np.isfinite(lat).all() for lat in a.latents)
    again = pipe.generate(media["image"], media["audio"], seed=0, **kw)
    np.testing.assert_array_equal(again.latents[0], a.latents[0])  # the step noise is a function of the seed
    other = pipe.generate(media["image"], media["audio"], seed=1, **kw)
    assert np.abs(other.latents[0] - a.latents[0]).max() > 1e-3
    with pytest.raises(ValueError, match="flow-matching sampler"):
        pipe.generate(media["image"], media["audio"], sampler="unipc", steps=2, progress=False)
