"""Images with Stable Diffusion 1.5 / SDXL (diffusers): text-to-image, img2img, inpainting, LoRAs, and LoRA training.

Modules: diffusion (DiffusionBackend: pipelines under the residency manager), request (GenerateRequest and results),
memory (the memory plan: attention slicing, tiled VAE), models (model folders and single-file checkpoints), tiny (the
untrained demo pipeline built offline), lora (reading and activating LoRA files), png (PNG metadata, gallery),
lora_backend (the training backend), lora_train / lora_train_loop (training data, the loop, saving).
"""

from backends.image.diffusion import SCHEDULERS, DiffusionBackend, DiffusionBusy, create
from backends.image.lora import LoraError
from backends.image.lora_backend import SdLoraBackend
from backends.image.lora_backend import create as create_lora_trainer
from backends.image.lora_train import LoraTrainConfig, TrainingDataError
from backends.image.models import ModelNotAvailable
from backends.image.png import GalleryItem, read_png_params
from backends.image.request import GenerateRequest, GenerationCancelled, GenerationResult, LoraChoice, RequestError

__all__ = [
    "SCHEDULERS", "DiffusionBackend", "DiffusionBusy", "GalleryItem", "GenerateRequest", "GenerationCancelled",
    "GenerationResult", "LoraChoice", "LoraError", "LoraTrainConfig", "ModelNotAvailable", "RequestError",
    "SdLoraBackend", "TrainingDataError", "create", "create_lora_trainer", "read_png_params",
]  # fmt: skip
