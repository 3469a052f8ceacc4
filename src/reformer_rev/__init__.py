"""reformer_rev: reversible Transformers as first-class Hugging Face models.

Importing the package registers the `reformer_rev` model type with the `transformers` Auto classes.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from .configuration_reformer_rev import RevFormerConfig
from .conversion import is_reversible, make_reversible, revert_reversible
from .modeling_reformer_rev import (
    RevFormerForCausalLM,
    RevFormerForQuestionAnswering,
    RevFormerForSequenceClassification,
    RevFormerForTokenClassification,
    RevFormerModel,
    RevFormerPreTrainedModel,
)
from .modeling_reformer_rev_seq2seq import RevFormerForConditionalGeneration, RevFormerSeq2SeqModel
from .reversible import run_reversible_stack

__version__ = "0.1.0"


def _register() -> None:
    AutoConfig.register(RevFormerConfig.model_type, RevFormerConfig, exist_ok=True)
    AutoModel.register(RevFormerConfig, RevFormerModel, exist_ok=True)
    AutoModelForCausalLM.register(RevFormerConfig, RevFormerForCausalLM, exist_ok=True)
    AutoModelForSeq2SeqLM.register(RevFormerConfig, RevFormerForConditionalGeneration, exist_ok=True)
    AutoModelForSequenceClassification.register(RevFormerConfig, RevFormerForSequenceClassification, exist_ok=True)
    AutoModelForTokenClassification.register(RevFormerConfig, RevFormerForTokenClassification, exist_ok=True)
    AutoModelForQuestionAnswering.register(RevFormerConfig, RevFormerForQuestionAnswering, exist_ok=True)
    # `save_pretrained` then writes `auto_map` and copies the modeling files for `trust_remote_code=True` loading.
    RevFormerConfig.register_for_auto_class()
    RevFormerModel.register_for_auto_class("AutoModel")
    RevFormerForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    RevFormerForConditionalGeneration.register_for_auto_class("AutoModelForSeq2SeqLM")
    RevFormerForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")
    RevFormerForTokenClassification.register_for_auto_class("AutoModelForTokenClassification")
    RevFormerForQuestionAnswering.register_for_auto_class("AutoModelForQuestionAnswering")


_register()

__all__ = [
    "RevFormerConfig",
    "RevFormerPreTrainedModel",
    "RevFormerModel",
    "RevFormerForCausalLM",
    "RevFormerForSequenceClassification",
    "RevFormerForTokenClassification",
    "RevFormerForQuestionAnswering",
    "RevFormerSeq2SeqModel",
    "RevFormerForConditionalGeneration",
    "run_reversible_stack",
    "make_reversible",
    "revert_reversible",
    "is_reversible",
    "__version__",
]
