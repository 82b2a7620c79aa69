"""What an nnU-Net ``plans.json`` may name, and building the network from exactly that.

nnU-Net resolves the class names in ``plans.json`` with ``pydoc.locate``, which follows module
attributes: ``dynamic_network_architectures.architectures.unet.torch.hub.load`` is a valid
"class" that imports code from a folder the plans choose. A signed bundle must not be able to run
code, so here every name is looked up in an exact table (name -> object) of the network classes
and ``*_op`` classes nnU-Net's own planners emit, keyword arguments must be plain JSON data, and
the other names nnU-Net looks up by string (preprocessor, resampling, normalization, label
manager) must be one of the names nnU-Net ships. Nothing is ever located from untrusted text.
"""

from __future__ import annotations

import numbers
from pathlib import Path
from typing import Any

from shared.plumbing.errors import IchfedError

# What nnU-Net v2's planners write as 'network_class_name' (default, ResEnc M/L/XL planners) plus
# the residual U-Net that dynamic_network_architectures ships beside them.
NETWORK_CLASSES = (
    "dynamic_network_architectures.architectures.unet.PlainConvUNet",
    "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
    "dynamic_network_architectures.architectures.unet.ResidualUNet",
)

# The '*_op' / 'nonlin' values planners emit (module.__name__ spelling and the 'torch.nn.X' short form).
_OPS = {
    "conv_op": ("Conv1d", "Conv2d", "Conv3d"),
    "norm_op": ("InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
                "GroupNorm", "LayerNorm"),
    "dropout_op": ("Dropout", "Dropout1d", "Dropout2d", "Dropout3d"),
    "nonlin": ("LeakyReLU", "ReLU", "PReLU", "GELU", "ELU", "SiLU", "Tanh", "Sigmoid"),
}
_OP_MODULES = {
    "Conv": "torch.nn.modules.conv", "InstanceNorm": "torch.nn.modules.instancenorm",
    "BatchNorm": "torch.nn.modules.batchnorm", "GroupNorm": "torch.nn.modules.normalization",
    "LayerNorm": "torch.nn.modules.normalization", "Dropout": "torch.nn.modules.dropout",
}

# Names nnU-Net finds by class/function name inside its own package (recursive_find_python_class).
_NNUNET_NAMES = {
    "preprocessor_name": {"DefaultPreprocessor"},
    "resampling_fn_data": {"resample_data_or_seg_to_shape", "resample_data_or_seg_to_spacing",
                           "resample_torch_fornnunet", "resample_torch_simple", "no_resampling_hack"},
    "normalization_schemes": {"CTNormalization", "ZScoreNormalization", "NoNormalization",
                              "RescaleTo01Normalization", "RGBTo01Normalization"},
}
_NNUNET_NAMES["resampling_fn_seg"] = _NNUNET_NAMES["resampling_fn_probabilities"] = _NNUNET_NAMES["resampling_fn_data"]
_LABEL_MANAGERS = {"LabelManager"}


def _op_table() -> dict[str, str]:
    """Every accepted op spelling -> the torch.nn class name it means."""
    table: dict[str, str] = {}
    for names in _OPS.values():
        for name in names:
            table[f"torch.nn.{name}"] = name
            prefix = next((p for p in _OP_MODULES if name.startswith(p)), None)
            table[f"{_OP_MODULES[prefix]}.{name}" if prefix else f"torch.nn.modules.activation.{name}"] = name
    return table


OP_NAMES = _op_table()


def _plain(value: Any) -> bool:
    """Plain JSON data only: numbers, strings, bools, None and lists/dicts of those."""
    if value is None or isinstance(value, bool | str):
        return True
    if isinstance(value, numbers.Real):
        return True
    if isinstance(value, list | tuple):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


def check_architecture(plans_path: Path | str, name: str, arch: Any) -> None:
    """Refuse an ``architecture`` entry unless it names only allow-listed classes and plain arguments."""
    where = f"{plans_path}: configuration {name!r}"
    if not isinstance(arch, dict) or not isinstance(arch.get("arch_kwargs"), dict):
        raise IchfedError(f"{where} has no 'architecture'")
    cls = arch.get("network_class_name")
    if cls not in NETWORK_CLASSES:
        raise IchfedError(f"{where}: network class {str(cls)[:120]!r} is not one nnU-Net's planners emit "
                          f"({', '.join(c.rsplit('.', 1)[1] for c in NETWORK_CLASSES)})")
    kwargs = arch["arch_kwargs"]
    requires = arch.get("_kw_requires_import", [])
    if not isinstance(requires, list | tuple) or any(r not in _OPS for r in requires):
        raise IchfedError(f"{where}: _kw_requires_import {str(requires)[:120]} may only list {', '.join(_OPS)}")
    for key, value in kwargs.items():
        if not _plain(value):
            raise IchfedError(f"{where}: arch_kwargs.{key} is not plain data")
        if key in _OPS and key not in requires and value is not None:
            raise IchfedError(f"{where}: arch_kwargs.{key} must be listed in _kw_requires_import")
    for key in requires:
        value = kwargs.get(key)
        if value is not None and not (isinstance(value, str) and OP_NAMES.get(value) in _OPS[key]):
            raise IchfedError(f"{where}: arch_kwargs.{key} {str(value)[:120]!r} is not an allowed torch.nn class")


def check_plans(plans: dict, plans_path: Path | str) -> None:
    """Check every string in ``plans`` that nnU-Net would turn into code; raise a one-line IchfedError."""
    configurations = plans.get("configurations", {})
    if not isinstance(configurations, dict):
        raise IchfedError(f"{plans_path}: 'configurations' must be an object")
    if plans.get("label_manager", "LabelManager") not in _LABEL_MANAGERS:
        raise IchfedError(f"{plans_path}: label_manager {str(plans.get('label_manager'))[:80]!r} is not nnU-Net's")
    for name, conf in configurations.items():
        if not isinstance(conf, dict):
            raise IchfedError(f"{plans_path}: configuration {name!r} must be an object")
        if "architecture" in conf or "inherits_from" not in conf:
            check_architecture(plans_path, name, conf.get("architecture"))
        for key, allowed in _NNUNET_NAMES.items():
            if key not in conf:
                continue
            values = conf[key] if isinstance(conf[key], list) else [conf[key]]
            bad = [v for v in values if v not in allowed]
            if bad:
                raise IchfedError(f"{plans_path}: configuration {name!r}: {key} {str(bad[0])[:80]!r} is not one nnU-Net ships")
        for key, value in conf.items():
            if not _plain(value):
                raise IchfedError(f"{plans_path}: configuration {name!r}: {key} is not plain data")


def build_network(configuration_manager, n_in: int, n_out: int, batch_norm: bool = False):
    """The network of a checked configuration, built from the exact tables (never ``pydoc.locate``).

    Mirrors ``nnunetv2.utilities.get_network_from_plans`` without deep supervision and without
    weight initialisation (the weights are loaded next). ``batch_norm`` is ``nnUNetTrainerBN``'s swap.
    """
    import dynamic_network_architectures.architectures.unet as unet
    import torch.nn as nn

    arch = {"network_class_name": configuration_manager.network_arch_class_name,
            "arch_kwargs": configuration_manager.network_arch_init_kwargs,
            "_kw_requires_import": list(configuration_manager.network_arch_init_kwargs_req_import)}
    check_architecture("plans.json", "?", arch)
    classes = {c: getattr(unet, c.rsplit(".", 1)[1]) for c in NETWORK_CLASSES}
    kwargs = dict(arch["arch_kwargs"])
    for key in arch["_kw_requires_import"]:
        if kwargs.get(key) is not None:
            kwargs[key] = getattr(nn, OP_NAMES[kwargs[key]])
    if batch_norm and kwargs.get("conv_op") is not None:
        from dynamic_network_architectures.building_blocks.helper import (
            get_matching_batchnorm,
        )

        kwargs["norm_op"] = get_matching_batchnorm(kwargs["conv_op"])
        kwargs["norm_op_kwargs"] = {"eps": 1e-5, "affine": True}
    kwargs["deep_supervision"] = False
    return classes[arch["network_class_name"]](input_channels=n_in, num_classes=n_out, **kwargs)
