"""Export a run's GPT-2 so that ``transformers`` and PEFT load it.

    python export.py runs/sonnet/full-model-gpt2/latest --out exported/sonnet
    python export.py runs/classifier/lora-sst/latest --out exported/sst --format both
    python -c "from transformers import pipeline; print(pipeline('text-generation', 'exported/sonnet')('Shall I'))"

``--format hf`` (default) writes a Hugging Face folder (config.json, model.safetensors, tokenizer): a
``GPT2LMHeadModel``, or for a classifier a ``GPT2ForSequenceClassification``; LoRA/DoRA adapters are merged
in. ``--format peft`` writes the adapters as a PEFT folder (adapter_config.json, adapter_model.safetensors),
with the base model in ``DIR/base`` when it is not a hub model or a folder. ``both``: hf in DIR, peft in
DIR/adapter. Bad input is one ``error:`` line, exit status 2 (``tasks.export``, ``methods.export``).
"""

from cli.common import run_main
from cli.export import main

if __name__ == "__main__":
    run_main(main)
