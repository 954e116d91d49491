"""Drop-in replacement for guided-diffusion's ``script_util`` (SPEC §3.1).

Code written against guided-diffusion switches by changing one import::

    from admkit.compat import create_model_and_diffusion, model_and_diffusion_defaults

The models are admkit's networks with the released checkpoints' state-dict keys; the diffusion
object offers the original's attributes and methods.
"""

from admkit.compat.gaussian_diffusion import create_gaussian_diffusion, space_timesteps
from admkit.compat.script_util import (
    NUM_CLASSES,
    add_dict_to_argparser,
    args_to_dict,
    classifier_and_diffusion_defaults,
    classifier_defaults,
    create_classifier,
    create_classifier_and_diffusion,
    create_model,
    create_model_and_diffusion,
    diffusion_defaults,
    model_and_diffusion_defaults,
    sr_create_model,
    sr_create_model_and_diffusion,
    sr_model_and_diffusion_defaults,
    str2bool,
)

__all__ = [
    "NUM_CLASSES",
    "add_dict_to_argparser",
    "args_to_dict",
    "classifier_and_diffusion_defaults",
    "classifier_defaults",
    "create_classifier",
    "create_classifier_and_diffusion",
    "create_gaussian_diffusion",
    "create_model",
    "create_model_and_diffusion",
    "diffusion_defaults",
    "model_and_diffusion_defaults",
    "space_timesteps",
    "sr_create_model",
    "sr_create_model_and_diffusion",
    "sr_model_and_diffusion_defaults",
    "str2bool",
]
