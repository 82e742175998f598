from tabs._placeholder import not_built_tab

TAB = not_built_tab(
    "Fine-tune",
    "Fine-tune an 8B chat model with QLoRA (nf4 base, LoRA adapters, gradient checkpointing) in under 10 GB of "
    "VRAM, from a JSONL dataset; the adapters it saves load in the Chat tab.",
)
