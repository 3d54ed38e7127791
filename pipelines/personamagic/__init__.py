"""PersonaMagic (Li et al., 2024): stage-regulated dynamic embeddings with Tandem Equilibrium.

* ``mapper``: the official-layout timestep mapper (base tokens + V-path bypass);
* ``contexts``: K / V text contexts (token injection, pre-final-LN bypass);
* ``stages``: static / dynamic stages, the IoU partition, timestep bins, percent ranges;
* ``losses``: masked MSE, Tandem Equilibrium, identity loss with λ_id(t);
* ``train``: the optimisation on the textual-inversion engine;
* ``apply``: per-stage / per-bin conditioning and the V-path patch; ``vpath``: that patch;
* ``files``: the safetensors format.
"""
from .mapper import MapperConfig, MapperOutput, PersonaMagicMapper, sinusoidal_time_code
from .stages import PRESETS, StagePlan

__all__ = ["MapperConfig", "MapperOutput", "PersonaMagicMapper", "PRESETS", "StagePlan", "sinusoidal_time_code"]
