"""HF checkpoint -> TensorRT-LLM checkpoint: the job (`job`), calibration (`calibrate`), inspect/unshard
(`inspect`) and one spec per architecture (`models/`)."""

from generator.convert.settings import ConvertSettings  # light: the CLI reads its defaults at import time

__all__ = ["ConvertSettings"]
