"""lorakit: LoRA adapters for PyTorch and transformers models, with PEFT's API and file format.

Migrating from PEFT is one import line::

    from lorakit import LoraConfig, get_peft_model, TaskType

Importing :mod:`lorakit.integrations.tasks` here registers the task wrappers with
``get_peft_model``; it does not import transformers.
"""

from lorakit._version import __version__
from lorakit.config import (
    EvaConfig,
    LoftQConfig,
    LoraConfig,
    LoraGAConfig,
    LoraRuntimeConfig,
    PeftType,
    TaskType,
)
from lorakit.errors import (
    AdapterError,
    AdapterFileError,
    AdapterMergeError,
    AdapterShapeError,
    AdapterStateDictError,
    BaseModelMismatchError,
    BaseModelMismatchWarning,
    ConfigError,
    DistributedError,
    ExportError,
    LorakitError,
    MixedBatchError,
    ModelNotFoundError,
    NoMatchingPeftModuleError,
    PeftError,
    PeftWarning,
    RequantizationWarning,
    ServingError,
    TargetingError,
    TargetingTypeError,
)
from lorakit.integrations.kbit import prepare_model_for_kbit_training
from lorakit.integrations.quantization import QUANTIZATIONS, base_model_bytes, quantization_config
from lorakit.integrations.tasks import (
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForImageClassification,
    PeftModelForMultipleChoice,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForSpeechSeq2Seq,
    PeftModelForTokenClassification,
    PeftModelForTranslation,
)
from lorakit.layers import LoraLayer, ModulesToSaveWrapper
from lorakit.layers.tuner_layer import BaseTunerLayer
from lorakit.model.eva import get_eva_state_dict, initialize_lora_eva_weights
from lorakit.model.inspection import inspect
from lorakit.model.lora_ga import preprocess_loraga
from lorakit.model.loraplus import create_loraplus_optimizer
from lorakit.persistence.hotswap import (
    hotswap_adapter,
    hotswap_adapter_from_state_dict,
    prepare_model_for_compiled_hotswap,
)
from lorakit.persistence.state_dict import (
    get_base_model_state_dict,
    get_peft_model_state_dict,
    set_base_model_state_dict,
    set_peft_model_state_dict,
)
from lorakit.rank import (
    ExtractResult,
    RankReport,
    ResizeResult,
    Spectrum,
    extract_adapter,
    rank_report,
    resize_adapter,
    resize_adapter_files,
)
from lorakit.wrapper.peft_model import (
    LoraModel,
    PeftMixedModel,
    PeftModel,
    get_peft_model,
    inject_adapter_in_model,
)
from lorakit.wrapper.status import TunerLayerStatus, TunerModelStatus, get_layer_status, get_model_status

__all__ = [
    "LoraConfig",
    "LoraRuntimeConfig",
    "LoftQConfig",
    "EvaConfig",
    "LoraGAConfig",
    "TaskType",
    "PeftType",
    "PeftModel",
    "PeftMixedModel",
    "LoraModel",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForImageClassification",
    "PeftModelForMultipleChoice",
    "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForSpeechSeq2Seq",
    "PeftModelForTokenClassification",
    "PeftModelForTranslation",
    "get_peft_model",
    "inject_adapter_in_model",
    "get_peft_model_state_dict",
    "set_peft_model_state_dict",
    "get_base_model_state_dict",
    "set_base_model_state_dict",
    "get_layer_status",
    "get_model_status",
    "TunerLayerStatus",
    "TunerModelStatus",
    "BaseTunerLayer",
    "LoraLayer",
    "ModulesToSaveWrapper",
    "inspect",
    "prepare_model_for_kbit_training",
    "quantization_config",
    "QUANTIZATIONS",
    "base_model_bytes",
    "create_loraplus_optimizer",
    "get_eva_state_dict",
    "initialize_lora_eva_weights",
    "preprocess_loraga",
    "hotswap_adapter",
    "hotswap_adapter_from_state_dict",
    "prepare_model_for_compiled_hotswap",
    "rank_report",
    "RankReport",
    "Spectrum",
    "resize_adapter",
    "resize_adapter_files",
    "ResizeResult",
    "extract_adapter",
    "ExtractResult",
    "LorakitError",
    "ConfigError",
    "TargetingError",
    "TargetingTypeError",
    "NoMatchingPeftModuleError",
    "PeftError",
    "AdapterError",
    "AdapterFileError",
    "AdapterShapeError",
    "AdapterStateDictError",
    "AdapterMergeError",
    "MixedBatchError",
    "BaseModelMismatchError",
    "BaseModelMismatchWarning",
    "DistributedError",
    "RequantizationWarning",
    "ServingError",
    "ModelNotFoundError",
    "ExportError",
    "PeftWarning",
    "__version__",
]
