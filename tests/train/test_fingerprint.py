"""Which config changes make a checkpoint "another run" (refused) and which only steer inference."""
import ml_collections
import pytest

from fmjax.train import checkpoint


def _config(**sample):
    return ml_collections.ConfigDict(dict(
        model=dict(name="unet", channels=32),
        objective=dict(name="diffusion", num_timesteps=1000,
                       sample=dict(sampler="ddim", num_steps=25, guidance_scale=2.0, **sample)),
        optimizer=dict(name="adam")))


def test_sampling_settings_may_change_between_training_and_eval():
    meta = dict(fingerprint=checkpoint.fingerprint(_config()))
    checkpoint.check_meta(meta, _config(eta=1.0), "/wd")
    changed = _config()
    changed.objective.sample.guidance_scale = 7.0
    changed.objective.sample.num_steps = 100
    checkpoint.check_meta(meta, changed, "/wd")


def test_old_checkpoints_with_sampling_settings_in_their_fingerprint_still_load():
    old = _config().to_dict()
    meta = dict(fingerprint={k: old[k] for k in ("model", "objective")})   # sample included
    changed = _config()
    changed.objective.sample.guidance_scale = 4.0
    checkpoint.check_meta(meta, changed, "/wd")


@pytest.mark.parametrize("key,value,expect", [
    ("objective.num_timesteps", 500, "objective.num_timesteps: saved 1000, now 500"),
    ("model.channels", 64, "model.channels: saved 32, now 64"),
])
def test_training_settings_still_refuse(key, value, expect):
    meta = dict(fingerprint=checkpoint.fingerprint(_config()))
    changed = _config()
    part, name = key.split(".")
    changed[part][name] = value
    with pytest.raises(checkpoint.IncompatibleCheckpointError, match=expect):
        checkpoint.check_meta(meta, changed, "/wd")


def test_clip_loss_impl_may_change_on_resume():
    """'gathered' and 'ring' compute the same loss: a CLIP run may resume with either, and a
    checkpoint saved before the key existed loads with it set."""
    def clip(**objective):
        return ml_collections.ConfigDict(dict(model=dict(name="clip", width=32),
                                              objective=dict(name="clip", **objective)))
    meta = dict(fingerprint=checkpoint.fingerprint(clip(loss_impl="gathered")))
    checkpoint.check_meta(meta, clip(loss_impl="ring"), "/wd")
    checkpoint.check_meta(dict(fingerprint=clip().to_dict()), clip(loss_impl="ring"), "/wd")
    with pytest.raises(checkpoint.IncompatibleCheckpointError, match="objective.lock"):
        checkpoint.check_meta(meta, clip(loss_impl="ring", lock="image"), "/wd")
