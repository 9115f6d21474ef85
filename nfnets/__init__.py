"""Normalizer-Free Networks (NFNets) with Adaptive Gradient Clipping, in JAX + Haiku + optax."""
from nfnets import weights
from nfnets.agc import agc, clip_fraction
from nfnets.layers import ACTIVATION_GAMMAS, SqueezeExcite, StochDepth, WSConv2D, activation
from nfnets.nf_resnet import NFResNet
from nfnets.nfnet import NFNet, VARIANTS, block_plan
from nfnets.optim import make_optimizer, make_schedule, warmup_cosine_schedule
from nfnets.param_groups import agc_mask, weight_decay_mask
from nfnets.registry import MODELS, ModelSpec, count_flops, create_model, get_spec, model_from_config

__all__ = [
    'weights',
    'agc', 'clip_fraction', 'ACTIVATION_GAMMAS', 'SqueezeExcite', 'StochDepth', 'WSConv2D', 'activation',
    'NFResNet', 'NFNet', 'VARIANTS', 'block_plan', 'agc_mask', 'make_optimizer', 'make_schedule',
    'warmup_cosine_schedule', 'weight_decay_mask', 'MODELS', 'ModelSpec', 'count_flops', 'create_model',
    'get_spec', 'model_from_config',
]
