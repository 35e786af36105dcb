"""Learning head roles with HardKuma gates (SPEC 4): ``learn_roles`` and its parts."""

from lychee_fx.learn.config import LearnConfig
from lychee_fx.learn.data import passkey_training_data
from lychee_fx.learn.hardkuma import HardKumaGates
from lychee_fx.learn.train import learn_roles

__all__ = ["learn_roles", "LearnConfig", "HardKumaGates", "passkey_training_data"]
