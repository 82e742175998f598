from tabs._placeholder import not_built_tab

TAB = not_built_tab(
    "VLM",
    "Chat about images with a LLaVA-architecture model (transformers' Llava classes; 4-bit LLaVA 1.5 7B from the "
    "Hub, or a small untrained demo model offline).",
)
