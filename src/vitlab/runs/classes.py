"""`fill_num_classes`: the class count a config leaves to the data (`data.num_classes: null`).

The model is built before the datamodule is set up, and reads its head size from
`${data.num_classes}`; so when the data config leaves the count open, the run asks the
datamodule's class to list its classes (`find_classes`, given the data keys it names:
`data_dir` for image folders, which list the disk; `flag` for MedMNIST, which looks the
set up) and writes the count into the config first. Every object built afterwards, and
the run config saved in the checkpoint, then sees the number.
"""

from __future__ import annotations

import inspect

import hydra
from omegaconf import DictConfig, open_dict

from vitlab.errors import ConfigError


def fill_num_classes(cfg: DictConfig) -> None:
    """Set `cfg.data.num_classes` from the data's classes when the config leaves it None.

    Only a datamodule class with a `find_classes` static method (image folders, MedMNIST)
    can count its classes; its parameters are data keys, passed from the config. For
    any other class, None is a `ConfigError`. A number in the config is left as it is:
    the datamodule checks it against the data.
    """
    data = cfg.data
    if data.get("num_classes") is not None:
        return
    target = data.get("_target_")
    try:
        datamodule_class = hydra.utils.get_object(str(target))
    except ImportError as err:
        raise ConfigError(f"data._target_={target!r} cannot be imported: {err}") from err
    find_classes = getattr(datamodule_class, "find_classes", None)
    if find_classes is None:
        raise ConfigError(
            f"data.num_classes=None but {target} cannot count its classes from the data; "
            "set data.num_classes=<n>"
        )
    keys = inspect.signature(find_classes).parameters
    with open_dict(cfg):
        cfg.data.num_classes = len(find_classes(**{key: data.get(key) for key in keys}))
