"""HF checkpoint -> TensorRT-LLM checkpoint: the job (`job`), calibration (`calibrate`), inspect/unshard
(`inspect`) and one spec per architecture (`models/`)."""

from generator.convert.job import ConvertSettings, convert_checkpoint

__all__ = ["ConvertSettings", "convert_checkpoint"]
