from tabs._placeholder import not_built_tab

TAB = not_built_tab(
    "Tiny LM lab",
    "Train a tiny GPT-style language model from scratch on the bundled Shakespeare texts, watch the loss fall and "
    "sample from it as it learns.",
)
